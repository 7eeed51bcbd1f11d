"""The trainer's components in one process: a whole step of ``train()`` (so a broken loop fails in seconds), the
step's update metrics over several optimizer steps, the rollout stage with online filtering against the oracle
engine, and the balancing step's update schedule."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mm_gmpo import distributed
from mm_gmpo.config import ConfigError, load_config, validate
from mm_gmpo.data.processing import load_processor
from mm_gmpo.data.synthetic import arithmetic_prompts
from mm_gmpo.inputs import PromptSampler
from mm_gmpo.metrics import StepTimer
from mm_gmpo.rollout.base import SamplingParams
from mm_gmpo.rollout.batch import BatchFiller, Generated, share_groups
from mm_gmpo.rollout.layout import rollout_layout
from mm_gmpo.rollout.oracle import OracleEngine
from mm_gmpo.update import step_update_metrics

ROOT = Path(__file__).resolve().parents[1]
CPU = distributed.DistInfo(0, 1, 0, torch.device("cpu"))


def test_one_step_of_train_logs_the_mean_over_its_two_optimizer_steps(tmp_path, monkeypatch, own_process_group):
    """One step of the default run with two mini-batches, in this process: the logged loss and grad norm are the
    means of the two optimizer steps' (computed here by hand), the last grad norm has its own key."""
    from mm_gmpo import components, trainer
    from mm_gmpo.logger import read_metrics

    seen = []
    real = components.policy_update

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(components, "policy_update", spy)
    out = tmp_path / "run"
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"),
                      [f"trainer.output_dir={out}", "trainer.total_steps=1", "trainer.rollout_batch_size=4",
                       "trainer.mini_batch_size=2", "rollout.n=4", "trainer.eval_every=0", "trainer.save_every=-1",
                       "trainer.export_hf=false",
                       "logging.tensorboard=false", "optim.lr=1e-2"])
    returned = trainer.train(cfg)
    logged = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1] and len(seen) == 2
    norms = [m["actor/grad_norm"] for m in seen]
    assert norms[0] > 0 and norms[1] > 0 and norms[0] != pytest.approx(norms[1])
    for key in ("actor/grad_norm", "loss/total", "loss/policy", "actor/micro_batches"):
        assert logged[0][key] == pytest.approx((seen[0][key] + seen[1][key]) / 2, rel=1e-9, abs=1e-12), key
    assert logged[0]["actor/grad_norm_last"] == pytest.approx(norms[1])
    assert logged[0]["actor/lr"] == pytest.approx(seen[1]["actor/lr"])
    assert returned["actor/grad_norm"] == pytest.approx(logged[0]["actor/grad_norm"])
    stages = {"prompts", "rollout", "balance", "old_logprob", "reward", "reward_busy", "advantage", "update", "step"}
    assert {f"timing/{s}_s" for s in stages} <= set(logged[0])
    assert 0 <= logged[0]["reward/mean"] <= 1 and logged[0]["perf/update_tokens_per_s"] > 0
    assert (out / "summary.md").exists() and not (out / "checkpoints").exists()


def test_step_update_metrics_means_extremes_sums_and_the_last_rate():
    hi, lo = "ratio/token_log_ratio_max", "ratio/token_log_ratio_min"
    a = {"actor/grad_norm": 1.0, "loss/total": 0.5, hi: 2.0, lo: 0.5, "actor/lr": 1e-3, "actor/skipped_step": 0.0,
         "perf/update_vision_patches": 10.0}
    b = {"actor/grad_norm": 3.0, "loss/total": -0.25, hi: 1.5, lo: 0.25, "actor/lr": 5e-4, "actor/skipped_step": 1.0,
         "perf/update_vision_patches": 6.0, "loss/kl": 0.1}
    m = step_update_metrics([a, b])
    assert m["actor/grad_norm"] == 2.0 and m["loss/total"] == 0.125 and m["actor/grad_norm_last"] == 3.0
    assert (m[hi], m[lo], m["actor/lr"]) == (2.0, 0.25, 5e-4)
    assert (m["actor/skipped_step"], m["perf/update_vision_patches"], m["loss/kl"]) == (1.0, 16.0, 0.1)
    assert step_update_metrics([a]) == {**a, "actor/grad_norm_last": 1.0}


class MixedOracle(OracleEngine):
    """The oracle engine, right on every sample of half the prompts (no signal) and on the first sample only of
    the others; which half alternates from round to round."""

    def __init__(self):
        super().__init__("correct")
        self.wrong, self.rounds = OracleEngine("wrong"), 0

    def generate(self, prompts, sampling):
        self.rounds += 1
        right, wrong = super().generate(prompts, sampling), self.wrong.generate(prompts, sampling)
        return [w if (x.prompt_index + self.rounds) % 2 == 0 and x.sample_index > 0 else x
                for x, w in zip(right, wrong, strict=True)]


def _filler(engine, *overrides):
    cfg = load_config(None, ["trainer.rollout_batch_size=4", "rollout.n=2", "trainer.reward_workers=0",
                             "algorithm.format_weight=0", *overrides])
    prompts = [replace(p, task="math") for p in arithmetic_prompts(16, seed=0, split="train")]
    sampler = PromptSampler(len(prompts), seed=3)
    return BatchFiller(cfg, engine, sampler, prompts, load_processor(), SamplingParams(n=2, max_tokens=8), None,
                       CPU, rollout_layout(0, 1)), prompts


def test_online_filtering_rolls_out_rounds_until_the_batch_holds_signal():
    filler, prompts = _filler(MixedOracle(), "algorithm.online_filtering=true", "algorithm.max_filter_rounds=4")
    order = PromptSampler(len(prompts), seed=3).next(8)
    timer = StepTimer("prompts", "rollout", "reward")
    gen = filler.fill(1, timer)
    # round 1 keeps prompts 1 and 3 of its four, round 2 prompts 0 and 2: the batch is full after two rounds
    assert [p.prompt.id for p in gen.prompts] == [prompts[order[i]].id for i in (1, 3, 4, 6)]
    assert torch.equal(gen.rewards, torch.tensor([1.0, 0.0] * 4))
    assert [x.prompt_index for x in gen.rollouts] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert {k: v for k, v in gen.metrics.items() if k.startswith("filter/")} == {
        "filter/rounds": 2.0, "filter/sampled_groups": 8.0, "filter/trained_groups": 4.0,
        "filter/dropped_groups": 4.0, "filter/surplus_groups": 0.0, "filter/fallback_groups": 0.0}
    assert gen.metrics["reward/accuracy"] == pytest.approx(12 / 16)  # over every sampled response
    assert all(timer.seconds(s) > 0 for s in ("prompts", "rollout", "reward"))


def test_online_filtering_without_signal_trains_on_one_group_of_the_last_round():
    filler, _ = _filler(OracleEngine("correct"), "algorithm.online_filtering=true", "algorithm.max_filter_rounds=2")
    gen = filler.fill(1, StepTimer())
    assert len(gen.prompts) == 1 and torch.equal(gen.rewards, torch.ones(2))
    # the fallback group is counted as trained, not dropped: trained + dropped + surplus = sampled
    assert {k: v for k, v in gen.metrics.items() if k.startswith("filter/")} == {
        "filter/rounds": 2.0, "filter/sampled_groups": 8.0, "filter/trained_groups": 1.0,
        "filter/dropped_groups": 7.0, "filter/surplus_groups": 0.0, "filter/fallback_groups": 1.0}


class LateOracle(MixedOracle):
    """Round 1 as MixedOracle (two of four groups half right); from round 2 on every group half right."""

    def generate(self, prompts, sampling):
        out = super().generate(prompts, sampling)
        if self.rounds == 1:
            return out
        right = OracleEngine.generate(self, prompts, sampling)
        wrong = self.wrong.generate(prompts, sampling)
        return [w if x.sample_index > 0 else x for x, w in zip(right, wrong, strict=True)]


def test_online_filtering_counts_in_band_groups_beyond_the_batch_as_surplus():
    filler, prompts = _filler(LateOracle(), "algorithm.online_filtering=true", "algorithm.max_filter_rounds=4")
    order = PromptSampler(len(prompts), seed=3).next(8)
    gen = filler.fill(1, StepTimer())
    # round 1 keeps prompts 1 and 3, round 2 all four: the first two of round 2 fill the batch, two are surplus
    assert [p.prompt.id for p in gen.prompts] == [prompts[order[i]].id for i in (1, 3, 4, 5)]
    assert {k: v for k, v in gen.metrics.items() if k.startswith("filter/")} == {
        "filter/rounds": 2.0, "filter/sampled_groups": 8.0, "filter/trained_groups": 4.0,
        "filter/dropped_groups": 2.0, "filter/surplus_groups": 2.0, "filter/fallback_groups": 0.0}


def test_share_groups_trains_the_batch_it_promises():
    """The issue's case (2 ranks, 4 groups a step): rank 0 found 4 in-band groups, rank 1 none: each trains 2, rank
    1 rank 0's last two; the old rule trained 2 + one all-zero fallback and threw 2 good groups away."""
    assert share_groups([4, 0], 2) == ([[(0, 0), (0, 1)], [(0, 2), (0, 3)]], [])
    assert share_groups([5, 1, 0, 3], 2) == ([[(0, 0), (0, 1)], [(1, 0), (0, 2)], [(0, 3), (0, 4)],
                                              [(3, 0), (3, 1)]], [(3, 2)])
    # too few in all (the rounds ran out): all trained, shares differ by at most one, rank 3 gets none (fallback)
    assert share_groups([3, 0, 0, 0], 2) == ([[(0, 0)], [(0, 1)], [(0, 2)], []], [])
    assert share_groups([0, 2, 1], 2) == ([[(1, 1)], [(1, 0)], [(2, 0)]], [])


@pytest.mark.parametrize("world", [2, 3, 8])
def test_share_groups_every_group_once_exactly_the_batch_and_few_moves(world):
    g = torch.Generator().manual_seed(world)
    per_rank = 4
    for _ in range(300):
        counts = torch.randint(0, 3 * per_rank, (world,), generator=g).tolist()
        if torch.rand((), generator=g) < 0.3:
            counts = torch.randint(0, per_rank + 1, (world,), generator=g).tolist()
        share, surplus = share_groups(counts, per_rank)
        trained = [grp for part in share for grp in part]
        every = sorted([(r, i) for r in range(world) for i in range(counts[r])])
        assert sorted(trained + surplus) == every  # each group trained or surplus, once
        want = min(sum(counts), per_rank * world)
        assert len(trained) == want
        sizes = [len(part) for part in share]
        assert max(sizes) <= per_rank and max(sizes) - min(sizes) <= 1
        # a rank keeps its own groups first: only what a rank lacks travels
        moved = sum(src != r for r, part in enumerate(share) for src, _ in part)
        assert moved == sum(max(0, len(share[r]) - counts[r]) for r in range(world))


def test_without_filtering_one_round_is_left_unscored():
    filler, prompts = _filler(OracleEngine("correct"))
    gen = filler.fill(1, StepTimer())
    assert gen.rewards is None and len(gen.prompts) == 4 and len(gen.rollouts) == 8
    assert not any(k.startswith(("reward/", "filter/")) for k in gen.metrics)
    order = PromptSampler(len(prompts), seed=3).next(4)
    assert [p.prompt.id for p in gen.prompts] == [prompts[i].id for i in order]


def test_balance_step_hands_the_update_its_whole_schedule():
    from mm_gmpo.balance import balance_step, update_schedule

    filler, _ = _filler(OracleEngine("correct"))
    gen = filler.fill(1, StepTimer())
    plan = balance_step(gen, 2, 2, 2, 7, CPU)
    assert plan.gen is gen and plan.schedule == update_schedule(8, 2, 2, 2, 7)
    assert len(plan.schedule) == 4 and all(len(part) == 4 for part in plan.schedule)
    for part in plan.schedule:  # whole prompt groups
        assert sorted(part) == sorted({i // 2 * 2 + s for i in part for s in (0, 1)})
    assert plan.metrics["perf/rank_token_imbalance"] == 1.0 and plan.metrics["perf/balance_moved_groups"] == 0.0
    one = Generated(gen.prompts[:1], gen.rollouts[:2], None)  # online filtering left a rank one group
    assert balance_step(one, 2, 2, 1, 7, CPU, uneven=True).schedule == [[0, 1]]


def test_the_rank_plan_moves_groups_only_within_their_mini_batch():
    from mm_gmpo.balance import _first_pass_plan, assign_groups, pace

    per_rank = [[400.0, 380.0, 350.0, 330.0], [10.0, 12.0, 14.0, 16.0]]  # rank 0 long, rank 1 short
    owner, minibatch, tokens = _first_pass_plan(per_rank, 2, 2, step=5)
    assert owner == [0] * 4 + [1] * 4 and sorted(minibatch[:4]) == sorted(minibatch[4:]) == [0, 0, 1, 1]
    new = assign_groups(tokens, owner, minibatch, 2)
    assert pace(tokens, new, minibatch, 2) < pace(tokens, owner, minibatch, 2)
    for k in (0, 1):  # each rank keeps its number of groups in each mini-batch
        assert sorted(new[g] for g in range(8) if minibatch[g] == k) == [0, 0, 1, 1]
    assert _first_pass_plan([[1.0], [2.0]], 2, 2, step=5) is None  # fewer groups than mini-batches


# ---------------------------------------------------------------- the distributed setup (moved from test_multirank.py)


def test_cpu_offload_gets_a_gloo_backend_beside_nccl(monkeypatch):
    """FSDP2's CPU offload keeps shards and gradients on the CPU, where NCCL cannot reduce them: the group is
    cpu:gloo,cuda:nccl then (plain NCCL otherwise), and collectives on no particular device use the GPU."""
    import torch.distributed as dist

    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.setdefault("backends", []).append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    distributed.init_distributed(cpu_collectives=True)
    distributed.init_distributed()
    distributed.init_distributed(backend="gloo")
    assert seen["backends"] == ["cpu:gloo,cuda:nccl", "nccl", "gloo"]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda: "cpu:gloo,cuda:nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert distributed._comm_device() == torch.device("cuda", 0)


def test_rollout_layout_slices():
    from mm_gmpo.rollout.layout import rollout_layout

    lay = rollout_layout(5, 8, 2)
    assert (lay.dp_rank, lay.dp_size, lay.tp_rank) == (2, 4, 1)
    assert lay.group_slice(3) == slice(12, 18)
    one = rollout_layout(5, 8)
    assert one.group_slice(3) == slice(15, 18)  # every rank its own engine: its own slice
    with pytest.raises(ValueError, match="must divide"):
        rollout_layout(0, 6, 4)


def test_tensor_parallel_size_is_checked_against_gpus_per_node():
    cfg = load_config(None, ["rollout.backend=vllm", "model.path=some/model", "rollout.tensor_parallel_size=8",
                             "trainer.rollout_batch_size=16",
                             "trainer.mini_batch_size=16"])
    validate(cfg, world_size=16, local_world_size=8)
    with pytest.raises(ConfigError, match=r"GPUs per node \(4\)"):
        validate(cfg, world_size=16, local_world_size=4)
    with pytest.raises(ConfigError, match="the hf engine runs one full copy"):
        validate(load_config(None, ["rollout.tensor_parallel_size=2"]), world_size=2)
