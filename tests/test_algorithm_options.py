"""Algorithm options of issue 19: KL to a reference policy (loss term or reward shaping; LoRA's reference is the
base with adapters off), DAPO-style online filtering (deterministic, resumable), validation settings (sampled
validation with mean@k / pass@k, validation before training)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm_gmpo.advantage import groups_in_band, kl_shaped_rewards
from mm_gmpo.config import ConfigError, load_config, validate
from mm_gmpo.validator import pass_counts

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SMALL = ["trainer.rollout_batch_size=4", "trainer.mini_batch_size=2", "rollout.n=4", "trainer.eval_every=0",
         "trainer.export_hf=false"]


def train(out: Path, *overrides: str, nproc: int = 1) -> tuple[list[dict], str]:
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    cmd = [*launch, str(ROOT / "scripts" / "train_mm.py"), f"trainer.output_dir={out}", *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()], r.stdout


def strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(("time", "timing/", "perf/"))} for row in rows]


# ---------------------------------------------------------------- pure functions


def test_groups_in_band_keeps_groups_with_signal():
    acc = torch.tensor([0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1], dtype=torch.float32)
    assert groups_in_band(acc, 4, 0.01, 0.99).tolist() == [False, True, False, True]
    # the bounds are exclusive (as EasyR1): (0, 1) drops exactly the all-wrong and all-right groups
    assert groups_in_band(acc, 4, 0.0, 1.0).tolist() == [False, True, False, True]
    assert groups_in_band(acc, 4, 0.25, 1.0).tolist() == [False, False, False, True]  # 0.25 itself is out


def test_kl_shaped_rewards_subtract_the_summed_token_kl():
    rewards = torch.tensor([1.0, 0.0])
    kl = torch.tensor([[0.5, 0.25, 9.0], [0.1, 0.2, 0.3]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    shaped, m = kl_shaped_rewards(rewards, kl, mask, 0.1)
    torch.testing.assert_close(shaped, torch.tensor([1.0 - 0.075, -0.06]))
    assert m["actor/kl_in_reward_mean"] == pytest.approx((0.75 + 0.6) / 2)


def test_pass_counts_prompts_with_one_correct_sample():
    assert pass_counts(torch.tensor([0.0, 0, 1, 0, 0, 0, 1, 1, 1]), 3) == 2.0
    assert pass_counts(torch.zeros(6), 3) == 0.0


@pytest.mark.parametrize("overrides, key", [
    (["algorithm.kl_coef=-0.1"], "algorithm.kl_coef"),
    (["algorithm.kl_penalty=k4"], "algorithm.kl_penalty"),
    (["algorithm.online_filtering=true", "algorithm.filter_low=0.9", "algorithm.filter_high=0.1"],
     "algorithm.filter_low"),
    (["algorithm.online_filtering=true", "algorithm.filter_low=0.5", "algorithm.filter_high=0.5"],
     "algorithm.filter_low"),
    (["algorithm.max_filter_rounds=0"], "algorithm.max_filter_rounds"),
    (["algorithm.clip_ratio_c=0.5"], "algorithm.clip_ratio_c"),
    (["rollout.val_n=4"], "rollout.val_n"),
    (["model.lora.rank=4", "model.lora.modules_to_save=[model.language_model.norm]", "algorithm.kl_coef=0.01"],
     "algorithm.kl_coef"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(load_config(None, overrides))


@pytest.mark.slow
def test_new_keys_are_documented():
    r = subprocess.run([sys.executable, "-m", "mm_gmpo.config"], capture_output=True, text=True, env=ENV, cwd=ROOT)
    for key in ("algorithm.kl_penalty", "algorithm.kl_in_reward", "algorithm.clip_ratio_c",
                "algorithm.online_filtering", "algorithm.filter_key", "algorithm.filter_low", "algorithm.filter_high",
                "algorithm.max_filter_rounds", "trainer.val_before_train", "rollout.val_temperature",
                "rollout.val_top_p", "rollout.val_n"):
        assert key in r.stdout, key


# ---------------------------------------------------------------- LoRA's reference: adapters off


def test_lora_reference_is_the_base_model_with_adapters_off():
    from mm_gmpo.lora import adapters_disabled, add_lora
    from mm_gmpo.models import build_model, tiny_qwen2_5_vl_config
    from mm_gmpo.policy import Policy, collate

    base = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float64, seed=0,
                       attn_implementation="eager")
    ids = torch.randint(0, 150000, (2, 12), generator=torch.Generator().manual_seed(0))
    b = collate(ids[:, :8].tolist(), ids[:, 8:].tolist(), pad_id=0)
    with torch.no_grad():
        want = Policy(base)(b)[0]
    add_lora(base, rank=4, alpha=8)
    with torch.no_grad():
        for n, p in base.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    policy = Policy(base)
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    with torch.no_grad():
        changed = policy(b)[0]
        with adapters_disabled(base):
            off = policy(b)[0]
        on_again = policy(b)[0]
    assert not torch.equal(changed, want)
    assert torch.equal(off, want)  # exactly the base: no second copy needed
    assert torch.equal(on_again, changed)
    assert flags == {n: p.requires_grad for n, p in base.named_parameters()}


# ---------------------------------------------------------------- in training


@pytest.mark.slow
def test_kl_is_zero_at_step_one_and_grows_and_lora_uses_no_copy(tmp_path):
    """One optimizer step per training step (mini-batch = batch), so step 1's loss sees the initial policy."""
    one = ["trainer.mini_batch_size=4"]
    rows, out = train(tmp_path / "kl", *SMALL, *one, "trainer.total_steps=4", "trainer.save_every=0",
                      "algorithm.kl_coef=0.01", "optim.lr=1e-2")
    assert "KL reference: a frozen FSDP2 copy of the initial policy" in out
    assert rows[0]["actor/kl_mean"] == 0.0 and rows[0]["loss/kl"] == 0.0  # reference == policy before any update
    assert rows[-1]["actor/kl_mean"] > rows[1]["actor/kl_mean"] > 0 and rows[0]["actor/kl_coef"] == 0.01
    assert "timing/ref_logprob_s" in rows[0]
    shaped, _ = train(tmp_path / "kl_reward", *SMALL, *one, "trainer.total_steps=3", "trainer.save_every=0",
                      "algorithm.kl_coef=0.01", "algorithm.kl_in_reward=true", "optim.lr=1e-2")
    assert shaped[0]["actor/kl_in_reward_mean"] == 0.0 and shaped[-1]["actor/kl_in_reward_mean"] > 0
    assert shaped[0]["reward/mean"] == rows[0]["reward/mean"]  # reward/* stay the unshaped rewards
    lora, out = train(tmp_path / "lora", *SMALL, *one, "trainer.total_steps=3", "trainer.save_every=0",
                      "algorithm.kl_coef=0.01", "model.lora.rank=4", "optim.lr=1e-2")
    assert "KL reference: the base model (LoRA adapters off), no second copy" in out
    assert lora[0]["actor/kl_mean"] == 0.0 and lora[-1]["actor/kl_mean"] > 0  # B = 0 at start: base == policy


@pytest.mark.slow
def test_online_filtering_drops_flat_groups_and_resumes_exactly(tmp_path):
    args = [*SMALL, "trainer.total_steps=4", "trainer.save_every=2", "algorithm.online_filtering=true",
            "algorithm.max_filter_rounds=3"]
    rows, _ = train(tmp_path / "full", *args)
    for row in rows:
        assert row["filter/trained_groups"] == 4 or row["filter/rounds"] == 3  # full, or out of rounds
    assert sum(row["filter/dropped_groups"] for row in rows) > 0  # the tiny model starts with all-wrong groups
    assert any(row["filter/rounds"] > 1 for row in rows)
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000004")
    again, _ = train(tmp_path / "resumed", *args)
    assert strip(again) == strip(rows)  # the data position counts every prompt the rounds consumed


@pytest.mark.slow
@pytest.mark.parametrize("option", ["algorithm.kl_coef=0.01", "algorithm.online_filtering=true"])
def test_builtin_task_still_learns(tmp_path, option):
    """The built-in task (2 gloo ranks, constant lr 1e-3) with kl_coef=0.01 (30 steps), and with online filtering
    (40 steps): the sampled reward rises (reward/sampled_mean counts every sampled response, filtered or not).
    Measured first-5 -> last-5: KL 0.275 -> 0.567 over 30 steps; filtering 0.302 -> 0.746 over 40 steps (2026-12-06,
    pillow 13, transformers 5.25; at 30 steps its last five land on a dip, 0.496, and the installs before gave
    0.541 there: this task is noisy over a few steps; both together: 0.30 -> 0.47 at seed 1, 0.28 -> 0.65 at seed 2
    over 40 steps). The step counts keep the slow tier within its time budget."""
    steps = 40 if "online_filtering" in option else 30
    rows, _ = train(tmp_path / "run", f"trainer.total_steps={steps}", "trainer.eval_every=0", "trainer.save_every=0",
                    "trainer.export_hf=false", "optim.lr_schedule=constant", option, nproc=2)
    key = "reward/sampled_mean" if "online_filtering" in option else "reward/mean"
    first = sum(r[key] for r in rows[:5]) / 5
    last = sum(r[key] for r in rows[-5:]) / 5
    print(f"\n{option}: {key} first-5 {first:.3f}, last-5 {last:.3f}")
    assert last > first + 0.2
    if "kl_coef" in option:
        assert rows[-1]["actor/kl_mean"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("family", ["tiny-random-qwen3-vl"])
def test_builtin_task_learns_with_each_model_family_and_resumes_exactly(tmp_path, family):
    """The built-in task on 2 gloo ranks (FSDP2, packed, constant lr 1e-3) with the tiny Qwen3-VL: the reward rises
    over 12 steps; killed after step 12's metrics but before its checkpoint, the run resumes from step 10 and logs
    steps 11 and 12 exactly as before (timings aside). Measured first-3 -> last-3 (2026-12-07, transformers 5.25):
    Qwen2-VL 0.253 -> 0.443, Qwen3-VL 0.289 -> 0.625, Qwen3-VL-MoE 0.297 -> 0.474; one learning run per feature
    stays in CI (the slow tier's time budget), the others are in benchmarks/RESULTS.md with their command (put the
    family in the list to run them). Every family's FSDP2 training, exact resume and export: test_distributed.py."""
    args = [f"model.path={family}", "trainer.total_steps=12", "trainer.eval_every=0", "trainer.save_every=10",
            "trainer.export_hf=false", "optim.lr_schedule=constant"]
    rows, _ = train(tmp_path / "run", *args, nproc=2)
    first = sum(r["reward/mean"] for r in rows[:3]) / 3
    last = sum(r["reward/mean"] for r in rows[-3:]) / 3
    print(f"\n{family}: reward/mean first-3 {first:.3f}, last-3 {last:.3f}")
    assert last > first + 0.15
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000012")
    again, out = train(tmp_path / "resumed", *args, nproc=2)
    assert "step_00000010" in out or len(again) == 12
    assert strip(again) == strip(rows)


@pytest.mark.slow
def test_sampled_validation_reports_mean_and_pass_at_k_and_runs_before_training(tmp_path):
    rows, out = train(tmp_path / "val", *SMALL[:-2], "trainer.export_hf=false", "trainer.total_steps=2",
                      "trainer.save_every=0", "trainer.eval_every=2", "trainer.val_before_train=true",
                      "rollout.val_n=4", "rollout.val_temperature=1.0")
    assert rows[0]["step"] == 0 and "eval/accuracy" in rows[0] and "before training" in out
    for row in (rows[0], rows[-1]):
        assert row["eval/mean@4"] == pytest.approx(row["eval/accuracy"])
        assert 0 <= row["eval/mean@4"] <= row["eval/pass@4"] <= 1
        assert row["eval/pass@4"] > row["eval/mean@4"]  # four colours, four samples: some prompts hit once
