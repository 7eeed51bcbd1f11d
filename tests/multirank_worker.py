"""Worker for tests/test_multirank.py: run under ``torchrun --nproc_per_node 4`` (gloo, CPU).

Every case runs on all four ranks, in order, and each rank writes ``<out>/<case>_rank<r>.json``. The process
group has a short timeout, so a case that would hang (ranks in different collectives) fails within a minute.

Cases
    tp_prompts     BatchFiller.fill() with rollout tensor parallelism 2 and a stub engine: the ranks of one TP group
                   submit the same prompts with the same sampler seed, and each trains on its own slice.
    eval_empty     Validator.run() with fewer validation prompts than engine groups, with a stub engine whose
                   generate is a collective over its TP group (as vLLM's is): no rank waits for one that skipped.
    metric_keys    metric reductions where ranks report different keys.
    resume_views   resume_point() where only rank 0 sees the checkpoint, and where all do.
    shared_folder  check_shared_folder() where ranks 1 and 3 write to a folder of their own (node-local disks).
    mixed_images   one FSDP2 update where ranks 0 and 2 hold image prompts and ranks 1 and 3 text-only ones.
    overlong       BatchFiller.fill() where every prompt of rank 1's share is too long: every rank stops with a DataError.
    sync_bf16      weight sync that casts each shard to bf16 before the gather: tensors equal fp32-gather-then-cast.
    balanced_update  old log-probs and two mini-batch updates over fixed rollouts, rank 0's long and the others'
                   short, with balance_step off and on: the same log-probs, losses and weights.
    filtering      BatchFiller.fill() with online filtering where the ranks find in-band groups at different rates
                   (rank 0 all, rank 1 none, rank 2 all, rank 3 from round 2 on; then a step where the rounds run
                   out): which groups each rank trains and the filter/* counts.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from mm_gmpo import distributed
from mm_gmpo.rollout.base import Rollout, SamplingParams

ROOT = Path(__file__).resolve().parents[1]


class StubEngine:
    """Records what it was asked to generate and the sampler's torch RNG draw; answers 'red'. With ``group`` its
    generate is a collective over that process group, as a vLLM engine's is over its TP group."""

    def __init__(self, group=None):
        self.calls: list[dict] = []
        self.group = group

    def generate(self, prompts, sampling: SamplingParams) -> list[Rollout]:
        if self.group is not None:
            t = torch.ones(1)
            dist.all_reduce(t, group=self.group)
        draw = torch.randint(0, 2**31 - 1, (1,)).item()  # what a sampler seeded from the global RNG would see
        self.calls.append({"ids": [p.prompt.id for p in prompts], "draw": draw})
        return [Rollout(i, s, list(p.input_ids), [12203], "red", [-0.5], "stop")
                for i, p in enumerate(prompts) for s in range(sampling.n)]


class BandEngine(StubEngine):
    """Answers each prompt's group half right (in the filter's band) or all wrong, by rank and round:
    ``in_band(rank, round)`` says which."""

    def __init__(self, rank: int, in_band):
        super().__init__()
        self.rank, self.in_band, self.rounds = rank, in_band, 0

    def generate(self, prompts, sampling: SamplingParams) -> list[Rollout]:
        self.rounds += 1
        good = self.in_band(self.rank, self.rounds)
        self.calls.append({"ids": [p.prompt.id for p in prompts], "in_band": good})
        return [Rollout(i, s, list(p.input_ids), [12203], p.prompt.ground_truth if good and s == 0 else "nothing",
                        [-0.5], "stop") for i, p in enumerate(prompts) for s in range(sampling.n)]


def _cfg(tmp: Path, *overrides: str):
    from mm_gmpo.config import load_config

    return load_config(str(ROOT / "configs" / "tiny.yaml"),
                       [f"trainer.output_dir={tmp}", "trainer.rollout_batch_size=8", "rollout.n=2", *overrides])


def case_tp_prompts(info, tmp: Path) -> dict:
    from mm_gmpo.data.processing import load_processor
    from mm_gmpo.data.synthetic import synthetic_prompts
    from mm_gmpo.inputs import PromptSampler
    from mm_gmpo.metrics import StepTimer
    from mm_gmpo.rollout.batch import BatchFiller
    from mm_gmpo.rollout.layout import rollout_layout

    cfg = _cfg(tmp)
    prompts = synthetic_prompts(32, seed=1)
    sampler = PromptSampler(len(prompts), seed=1)
    engine = StubEngine()
    layout = rollout_layout(info.rank, info.world_size, 2)
    filler = BatchFiller(cfg, engine, sampler, prompts, load_processor(), SamplingParams(n=2, max_tokens=1), None,
                         info, layout)
    gen = filler.fill(3, StepTimer())
    global_batch = [prompts[i].id for i in PromptSampler(len(prompts), seed=1).next(8)]
    return {"submitted": engine.calls[0]["ids"], "draw": engine.calls[0]["draw"],
            "trained": [p.prompt.id for p in gen.prompts], "rollouts": len(gen.rollouts),
            "prompt_index": [x.prompt_index for x in gen.rollouts], "global_batch": global_batch,
            "layout": [layout.dp_rank, layout.tp_rank]}


def case_overlong(info, tmp: Path) -> dict:
    from mm_gmpo.data.processing import load_processor
    from mm_gmpo.data.prompts import DataError
    from mm_gmpo.data.synthetic import synthetic_prompts
    from mm_gmpo.inputs import PromptSampler
    from mm_gmpo.metrics import StepTimer
    from mm_gmpo.rollout.batch import BatchFiller
    from mm_gmpo.rollout.layout import rollout_layout

    cfg = _cfg(tmp, f"data.max_prompt_length={5 if info.rank == 1 else 512}")
    prompts = synthetic_prompts(32, seed=1)
    try:
        BatchFiller(cfg, StubEngine(), PromptSampler(len(prompts), seed=1), prompts, load_processor(),
                    SamplingParams(n=2, max_tokens=1), None, info, rollout_layout(info.rank, info.world_size)
                    ).fill(1, StepTimer())
        return {"error": None}
    except DataError as e:
        return {"error": str(e)}


def case_eval_empty(info, tmp: Path) -> dict:
    from mm_gmpo.data.processing import encode_prompts, load_processor
    from mm_gmpo.data.synthetic import synthetic_prompts
    from mm_gmpo.logger import MetricsLogger
    from mm_gmpo.rollout.layout import rollout_layout
    from mm_gmpo.validator import Validator

    cfg = _cfg(tmp)
    layout = rollout_layout(info.rank, info.world_size, 2)
    tp_group = None
    for g in range(layout.dp_size):  # every rank creates every group, in the same order
        ranks = list(range(g * 2, g * 2 + 2))
        pg = dist.new_group(ranks)
        if info.rank in ranks:
            tp_group = pg
    val = synthetic_prompts(1, seed=1, split="val")[layout.dp_rank::layout.dp_size]  # group 1 gets nothing
    encoded, _ = encode_prompts(val, load_processor(), max_prompt_length=512, min_pixels=3136, max_pixels=12544)
    engine = StubEngine(group=tp_group)
    validator = Validator(cfg, engine, encoded, None, info, layout, MetricsLogger(tmp, enabled=False), None)
    metrics = validator.run(1, seed=5)
    return {"metrics": metrics, "generated": len(engine.calls)}


def case_metric_keys(info, tmp: Path) -> dict:
    local = {"common": float(info.rank), "ratio_max": float(info.rank)}
    if info.rank % 2:  # odd ranks report a key the others do not, and lack one they have
        local["only_odd"] = 10.0 + info.rank
    else:
        local["only_even_min"] = 5.0 - info.rank
    mean = distributed.all_reduce_mean_metrics(local)
    total = distributed.all_reduce_sum_metrics({"loss/x": 1.0} if info.rank == 0 else {})
    return {"mean": mean, "sum": total}


def case_resume_views(info, tmp: Path) -> dict:
    from mm_gmpo.checkpoint import TrainerState, resume_point, save_checkpoint
    from mm_gmpo.models import build_model, tiny_qwen2_5_vl_config
    from mm_gmpo.policy import Policy

    shared = tmp / "shared_ckpts"
    model = build_model("tiny", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float32, seed=0)
    policy = Policy(model, chunk_size=8)
    distributed.parallelize(policy, param_dtype=None, reduce_dtype=None, activation_checkpointing=False)
    save_checkpoint(shared, policy, None, None, TrainerState(step=2))
    # only rank 0 sees the checkpoint (the others look at folders of their own, as on node-local disks)
    own = shared if info.is_main else tmp / f"own_{info.rank}"
    alone, skipped = resume_point(own)
    everyone, _ = resume_point(shared)
    return {"alone": str(alone), "skipped": skipped, "everyone": everyone.name if everyone else None}


def case_shared_folder(info, tmp: Path) -> dict:
    from mm_gmpo.config import ConfigError
    from mm_gmpo.run_folder import check_shared_folder

    common = tmp / "run"
    common.mkdir(exist_ok=True)
    check_shared_folder(common, info)  # one folder for all: passes
    own = common if info.rank % 2 == 0 else tmp / f"node_local_{info.rank}"
    own.mkdir(exist_ok=True)
    try:
        check_shared_folder(own, info)
        error = None
    except ConfigError as e:
        error = str(e)
    return {"error": error, "leftovers": sorted(p.name for p in common.iterdir())}


def case_mixed_images(info, tmp: Path) -> dict:
    from mm_gmpo.loss import gmpo_loss
    from mm_gmpo.models import build_model, tiny_qwen2_5_vl_config
    from mm_gmpo.optim import build_optimizer
    from mm_gmpo.policy import Policy, collate
    from mm_gmpo.update import UpdateBatch, policy_update

    model = build_model("tiny", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float32, seed=0)
    policy = Policy(model, chunk_size=8)
    distributed.parallelize(policy, param_dtype=None, reduce_dtype=None, activation_checkpointing=True)
    optimizer = build_optimizer(policy, lr=1e-3)
    g = torch.Generator().manual_seed(10 + info.rank)
    text = torch.randint(0, 150000, (5,), generator=g).tolist()
    response = [torch.randint(0, 150000, (4,), generator=g).tolist() for _ in range(2)]
    if info.rank % 2 == 0:  # two image prompts
        prompt = [151644, 872, 198, 151652, 151655, 151655, 151655, 151655, 151653, *text]
        batch = collate([prompt] * 2, response, pad_id=151643,
                        pixel_values=[torch.randn(16, 3 * 2 * 14 * 14, generator=g)] * 2,
                        image_grid_thw=[torch.tensor([[1, 4, 4]])] * 2)
    else:  # two text-only prompts
        batch = collate([[151644, 872, 198, *text]] * 2, response, pad_id=151643)
    old = (-11.93 + 0.3 * torch.randn(batch.response_mask.shape, generator=g)) * batch.response_mask
    data = UpdateBatch(batch, old, torch.tensor([1.0, -1.0]))
    before = {n: distributed.full_tensor(p.data).clone() for n, p in policy.named_parameters() if "visual" in n}
    metrics = policy_update(policy, optimizer, data, gmpo_loss, max_grad_norm=0.0, device=torch.device("cpu"))
    after = {n: distributed.full_tensor(p.data) for n, p in policy.named_parameters() if "visual" in n}
    moved = sum(float((after[n] - before[n]).abs().sum()) for n in before)
    return {"loss": metrics["loss/total"], "grad_norm": metrics["actor/grad_norm"], "vision_moved": moved}


def case_sync_bf16(info, tmp: Path) -> dict:
    from mm_gmpo.models import build_model, tiny_qwen2_5_vl_config
    from mm_gmpo.policy import Policy
    from mm_gmpo.weight_sync import sync_weights

    class Collect:
        def __init__(self):
            self.got: dict[str, torch.Tensor] = {}

        def update_weights(self, named):
            self.got = {n: t.clone() for n, t in named}

    model = build_model("tiny", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float32, seed=0)
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    policy = Policy(model, chunk_size=8)
    distributed.parallelize(policy, param_dtype=None, reduce_dtype=None, activation_checkpointing=False)
    gathered_dtypes = set()
    real_full_tensor = distributed.full_tensor

    def spy(t):
        gathered_dtypes.add(str(t.dtype))
        return real_full_tensor(t)

    import mm_gmpo.weight_sync as ws

    ws.full_tensor = spy
    try:
        engine = Collect()
        stats = sync_weights(policy, engine, dtype=torch.bfloat16)
    finally:
        ws.full_tensor = real_full_tensor
    exact = all(torch.equal(engine.got[n], full[n].to(torch.bfloat16)) for n in full)
    return {"gathered_dtypes": sorted(gathered_dtypes), "exact": exact, "names": len(engine.got) == len(full),
            "gathered_gb": stats["perf/weight_sync_gathered_gb"], "sent_gb": stats["perf/weight_sync_gb"]}


def _balanced_run(info, enabled: bool) -> dict:
    """One training step's old log-probs and two mini-batch updates over fixed rollouts: rank 0's responses are
    long, the others' short (so the ranks are unbalanced), through balance_step on or off."""
    from mm_gmpo.advantage import group_advantages
    from mm_gmpo.balance import balance_step
    from mm_gmpo.data.processing import encode_prompts, load_processor
    from mm_gmpo.data.synthetic import synthetic_prompts
    from mm_gmpo.logprobs import compute_logprobs
    from mm_gmpo.loss import gmpo_loss
    from mm_gmpo.models import build_model, tiny_qwen2_5_vl_config
    from mm_gmpo.optim import build_optimizer
    from mm_gmpo.policy import Policy
    from mm_gmpo.rollout.batch import Generated, to_batch
    from mm_gmpo.update import UpdateBatch, policy_update

    n, groups, n_mini, step = 2, 4, 2, 5
    prompts = synthetic_prompts(groups * info.world_size, seed=3)[info.rank * groups:(info.rank + 1) * groups]
    encoded, _ = encode_prompts(prompts, load_processor(), max_prompt_length=512, min_pixels=3136, max_pixels=3136)
    rollouts = []
    for q, enc in enumerate(encoded):
        for s in range(n):
            g = torch.Generator().manual_seed(1000 * info.rank + 10 * q + s)
            length = (40 if info.rank == 0 else 4) + 3 * q + s
            rollouts.append(Rollout(q, s, list(enc.input_ids), torch.randint(0, 150000, (length,), generator=g).tolist(),
                                    "x", None, "stop"))
    rewards = torch.tensor([float((info.rank + q + s) % 3) for q in range(groups) for s in range(n)])
    gen = Generated(encoded, rollouts, rewards)
    balanced = balance_step(gen, n, n_mini, 1, step, info, enabled=enabled)
    gen = balanced.gen
    model = build_model("tiny", random_init=True, config=tiny_qwen2_5_vl_config(hidden_size=32, layers=1, vision_depth=1),
                        dtype=torch.float32, seed=0, attn_implementation="sdpa")
    policy = Policy(model, chunk_size=64, packed=True)
    distributed.parallelize(policy, param_dtype=None, reduce_dtype=None, activation_checkpointing=False)
    optimizer = build_optimizer(policy, lr=1e-3)
    batch, _ = to_batch(gen.prompts, gen.rollouts, 151643)
    cpu = torch.device("cpu")
    old = compute_logprobs(policy, batch, max_tokens_per_micro_batch=120, device=cpu, group_size=n)
    advantages, _ = group_advantages(gen.rewards, n)
    data = UpdateBatch(batch, old, advantages)
    losses, norms, micro = [], [], []
    for part in balanced.schedule:
        m = policy_update(policy, optimizer, data.select(part), gmpo_loss, max_tokens_per_micro_batch=120,
                          max_grad_norm=0.0, device=cpu, group_size=n)
        losses.append(m["loss/total"])
        norms.append(m["actor/grad_norm"])
        micro.append(m["actor/micro_batches"])
    params = {k: distributed.full_tensor(p.data) for k, p in policy.named_parameters()}
    # every response's old log-prob sum, keyed by (prompt id, sample): where it was computed must not matter
    lp = {f"{gen.prompts[x.prompt_index].prompt.id}/{x.sample_index}": float(old[i].sum())
          for i, x in enumerate(gen.rollouts)}
    return {"metrics": balanced.metrics, "losses": losses, "norms": norms, "micro": micro, "params": params,
            "logprobs": distributed.gather_dicts(lp), "ids": [p.prompt.id for p in gen.prompts]}


def case_balanced_update(info, tmp: Path) -> dict:
    plain, moved = _balanced_run(info, enabled=False), _balanced_run(info, enabled=True)
    diff = max(float((plain["params"][k] - moved["params"][k]).abs().max()) for k in plain["params"])
    lp_diff = max(abs(plain["logprobs"][k] - moved["logprobs"][k]) for k in plain["logprobs"])
    return {"plain": {k: v for k, v in plain.items() if k != "params"},
            "moved": {k: v for k, v in moved.items() if k != "params"},
            "param_max_diff": diff, "logprob_max_diff": lp_diff,
            "param_change": max(float(p.abs().max()) for p in moved["params"].values())}


def case_filtering(info, tmp: Path) -> dict:
    from mm_gmpo.data.processing import load_processor
    from mm_gmpo.data.synthetic import synthetic_prompts
    from mm_gmpo.inputs import PromptSampler
    from mm_gmpo.metrics import StepTimer
    from mm_gmpo.rollout.batch import BatchFiller
    from mm_gmpo.rollout.layout import rollout_layout

    out = {}
    for name, rounds, in_band in (
            ("enough", 4, lambda rank, rnd: rank in (0, 2) or (rank == 3 and rnd >= 2)),
            ("short", 2, lambda rank, rnd: rank == 0 and rnd == 1)):
        cfg = _cfg(tmp, "algorithm.online_filtering=true", f"algorithm.max_filter_rounds={rounds}",
                   "trainer.reward_workers=0", "algorithm.format_weight=0")
        prompts = synthetic_prompts(64, seed=1)
        engine = BandEngine(info.rank, in_band)
        filler = BatchFiller(cfg, engine, PromptSampler(len(prompts), seed=1), prompts, load_processor(),
                             SamplingParams(n=2, max_tokens=1), None, info, rollout_layout(info.rank, info.world_size))
        gen = filler.fill(1, StepTimer())
        in_band_ids = [i for c in engine.calls if c["in_band"] for i in c["ids"]]
        out[name] = {"trained": [p.prompt.id for p in gen.prompts], "rewards": gen.rewards.tolist(),
                     "in_band_found": in_band_ids, "sampled": [i for c in engine.calls for i in c["ids"]],
                     "prompt_index": [x.prompt_index for x in gen.rollouts],
                     "metrics": {k: v for k, v in gen.metrics.items() if k.startswith("filter/")}}
    return out


CASES = {"tp_prompts": case_tp_prompts, "overlong": case_overlong, "eval_empty": case_eval_empty, "metric_keys": case_metric_keys,
         "resume_views": case_resume_views, "shared_folder": case_shared_folder, "mixed_images": case_mixed_images,
         "sync_bf16": case_sync_bf16, "balanced_update": case_balanced_update, "filtering": case_filtering}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = distributed.init_distributed(backend="gloo", timeout_s=60)
    out = Path(args.out)
    for name in args.cases.split(","):
        tmp = out / f"tmp_{name}"
        if info.is_main:
            tmp.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        result = CASES[name](info, tmp)
        (out / f"{name}_rank{info.rank}.json").write_text(json.dumps(result))
        distributed.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
