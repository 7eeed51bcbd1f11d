"""FSDP2 under torchrun (gloo, 2 CPU ranks): one step equals the unsharded step; checkpoints resume exactly,
on the same and on a different world size; the HF export reloads with from_pretrained and gives the same log-probs.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # every test here starts torchrun ranks

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_worker(nproc: int, out: Path, *args: str) -> dict:
    if nproc == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER)]
    r = subprocess.run([*cmd, *args, "--out", str(out)], capture_output=True, text=True, timeout=600, env=ENV,
                       cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(out, weights_only=False)


def max_rel_grad_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b) and a
    return max(((a[k] - b[k]).norm() / (a[k].norm() + 1e-30)).item() for k in a)


def max_param_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b) and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_adam_params_agree(a: dict, b: dict, grads: dict, lr: float, steps: int) -> None:
    """Parameters after ``steps`` AdamW steps from the same start: within 1e-6 wherever the gradient is well above
    Adam's eps (1e-8), where the update lr * m / (sqrt(v) + eps) is well-conditioned; elsewhere (a gradient near
    eps, where a 1e-9 difference in summation order moves the update by a visible fraction of lr) within the most
    Adam can move a parameter, lr per step."""
    assert set(a) == set(b) and a
    by_name = {k.removeprefix("model."): g for k, g in grads.items()}  # Policy names -> model names
    checked = 0
    for k in a:
        d = (a[k] - b[k]).abs()
        assert d.max().item() <= 2 * lr * steps + 1e-7, k
        g = by_name.get(k)
        if g is not None:
            well = g.abs() > 1e-6
            checked += int(well.sum())
            assert d[well].max().item() < 1e-6 if well.any() else True, k
    assert checked > 1000


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """3 steps on 2 ranks, checkpoint after step 2, HF export at the end."""
    d = tmp_path_factory.mktemp("dist")
    out = run_worker(2, d / "train.pt", "--mode", "train", "--steps", "3", "--save-at", "2", "--ckpt", str(d / "ck"),
                     "--export", str(d / "hf"))
    return d, out


def test_fsdp_step_equals_unsharded_step(tmp_path):
    ref = run_worker(1, tmp_path / "ref.pt", "--mode", "step", "--fsdp", "0", "--max-grad-norm", "0")
    fsdp = run_worker(2, tmp_path / "fsdp.pt", "--mode", "step", "--max-grad-norm", "0")
    assert ref["world_size"] == 1 and fsdp["world_size"] == 2
    assert fsdp["losses"][1] == pytest.approx(ref["losses"][1], rel=1e-6, abs=1e-7)
    # un-clipped gradients: a wrong normalisation (e.g. FSDP's mean over ranks left in) shows up as 0.5 here
    assert fsdp["grad_norms"][1] == pytest.approx(ref["grad_norms"][1], rel=1e-5)
    assert max_rel_grad_diff(fsdp["grads"], ref["grads"]) < 1e-5
    assert ref["grad_norms"][1] > 0.1  # a real, non-degenerate gradient
    assert max_param_diff(fsdp["state_dict"], ref["state_dict"]) < 1e-6
    torch.testing.assert_close(fsdp["logprobs"], ref["logprobs"], rtol=0, atol=1e-5)
    # the same step with padding-free packed micro-batches on each rank
    packed = run_worker(2, tmp_path / "packed.pt", "--mode", "step", "--max-grad-norm", "0", "--packed", "1")
    assert packed["losses"][1] == pytest.approx(ref["losses"][1], rel=1e-6, abs=1e-7)
    assert packed["grad_norms"][1] == pytest.approx(ref["grad_norms"][1], rel=1e-5)
    assert max_rel_grad_diff(packed["grads"], ref["grads"]) < 1e-5
    assert_adam_params_agree(packed["state_dict"], ref["state_dict"], ref["grads"], ref["lr"], 2)


def test_checkpoint_layout_and_resume_same_world_size(trained, tmp_path):
    d, train = trained
    ck = d / "ck"
    assert (ck / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in (ck / "step_00000002" / "rng").iterdir()) == ["rank_0.pt", "rank_1.pt"]
    resumed = run_worker(2, tmp_path / "r2.pt", "--mode", "resume", "--steps", "3", "--ckpt", str(ck))
    assert list(resumed["losses"]) == [3]  # continued at the step after the checkpoint
    assert resumed["losses"][3] == pytest.approx(train["losses"][3], rel=1e-6)
    assert resumed["draws"][3] == train["draws"][3]  # RNG state restored
    assert resumed["lr"] == pytest.approx(train["lr"])  # LR schedule restored
    assert max_param_diff(resumed["state_dict"], train["state_dict"]) < 1e-6
    assert max_rel_grad_diff(resumed["grads"], train["grads"]) < 1e-5


def test_resume_two_ranks_onto_one(trained, tmp_path):
    d, train = trained
    resumed = run_worker(1, tmp_path / "r1.pt", "--mode", "resume", "--steps", "3", "--ckpt", str(d / "ck"))
    assert resumed["world_size"] == 1
    assert resumed["losses"][3] == pytest.approx(train["losses"][3], rel=1e-5)
    assert resumed["draws"][3] == train["draws"][3]  # rank 0's RNG
    assert max_param_diff(resumed["state_dict"], train["state_dict"]) < 1e-6
    assert max_rel_grad_diff(resumed["grads"], train["grads"]) < 1e-5


def test_hf_export_reloads_with_same_logprobs(trained):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    sys.path.insert(0, str(ROOT / "tests"))
    from dist_worker import make_global_batch

    from mm_gmpo.policy import Policy

    d, train = trained
    model = AutoModelForImageTextToText.from_pretrained(d / "hf", dtype=torch.float32)
    assert AutoProcessor.from_pretrained(d / "hf").tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    sd = model.state_dict()
    for k, v in train["state_dict"].items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0)
    with torch.no_grad():
        lp, _ = Policy(model.eval())(make_global_batch(99).batch)
    torch.testing.assert_close(lp, train["logprobs"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["tiny-random-qwen2-vl", "tiny-random-qwen3-vl", "tiny-random-qwen3-vl-moe"])
def test_each_family_trains_on_two_ranks_resumes_exactly_and_exports(family, tmp_path):
    """Qwen2-VL, Qwen3-VL (DeepStack) and Qwen3-VL-MoE (experts sharded with their layer) under FSDP2 on 2 ranks,
    packed micro-batches (the MoE padded: its packed run is the learning run in test_algorithm_options.py): 3 updates; resumed from the step-2 checkpoint, step 3 is the same update; the HF export reloads with
    AutoModelForImageTextToText.from_pretrained, holds the trained weights and gives the trainer's log-probs.
    (The real trainer's resume with each family: test_algorithm_options.py.)"""
    from transformers import AutoModelForImageTextToText

    sys.path.insert(0, str(ROOT / "tests"))
    from dist_worker import make_global_batch

    from mm_gmpo.families import family_of
    from mm_gmpo.policy import Policy

    ck, hf = tmp_path / "ck", tmp_path / "hf"
    packed = "0" if family.endswith("-moe") else "1"
    train = run_worker(2, tmp_path / "t.pt", "--mode", "train", "--steps", "3", "--save-at", "2", "--ckpt", str(ck),
                       "--export", str(hf), "--packed", packed, "--model", family)
    resumed = run_worker(2, tmp_path / "r.pt", "--mode", "resume", "--steps", "3", "--ckpt", str(ck), "--packed", packed,
                         "--model", family)
    assert list(resumed["losses"]) == [3] and resumed["losses"][3] == pytest.approx(train["losses"][3], rel=1e-6)
    assert max_param_diff(resumed["state_dict"], train["state_dict"]) < 1e-6
    assert train["grad_norms"][3] > 0
    model = AutoModelForImageTextToText.from_pretrained(hf, dtype=torch.float32)
    assert family_of(model.config).name == ("qwen2_vl" if "qwen2" in family else "qwen3_vl")
    sd = model.state_dict()
    for k, v in train["state_dict"].items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0)
    with torch.no_grad():
        lp, _ = Policy(model.eval())(make_global_batch(99, model.config.vision_config.patch_size).batch)
    torch.testing.assert_close(lp, train["logprobs"], rtol=0, atol=1e-5)


def test_interrupted_save_never_replaces_the_last_checkpoint(trained, tmp_path):
    """A kill mid-save leaves a .tmp_ folder: it is ignored, the last finished checkpoint is what resumes."""
    import shutil

    from mm_gmpo.checkpoint import latest_checkpoint

    d, _ = trained
    ck = tmp_path / "ck"
    shutil.copytree(d / "ck", ck)
    partial = ck / ".tmp_step_00000003"
    (partial / "model_optim").mkdir(parents=True)
    (partial / "model_optim" / "__0_0.distcp").write_bytes(b"half a shard")
    assert latest_checkpoint(ck).name == "step_00000002"
    # a step folder without trainer_state.json (not finished) is not a checkpoint either
    (ck / "step_00000004").mkdir()
    assert latest_checkpoint(ck).name == "step_00000002"


def test_weight_sync_from_fsdp_policy_into_engine(tmp_path):
    """After a training step, every rank's engine (other random weights) matches the trainer only after sync."""
    out = run_worker(2, tmp_path / "sync.pt", "--mode", "sync", "--steps", "1")
    assert out["world_size"] == 2
    assert out["before_max_diff_sum"] > 0.1  # the engine really had other weights
    assert out["after_max_diff_sum"] < 1e-5  # summed over both ranks
    assert out["metrics"]["perf/weight_sync_tensors"] == 56  # every parameter, the tied head once
