"""The GPU benchmarks run on CPU with the tiny model (format and plumbing; their figures mean nothing here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def bench(script: str, out: Path, *args: str) -> dict:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--out", str(out), *args],
                       capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rec = json.loads(out.read_text().splitlines()[-1])
    assert rec["command"].startswith("python ") and script in rec["command"]
    assert rec["env"]["torch"] and rec["env"]["device"] == "cpu"
    assert "| figure | value |" in r.stdout
    return rec["figures"]


@pytest.mark.slow
def test_bench_update_reports_throughput(tmp_path):
    f = bench("bench_update.py", tmp_path / "r.jsonl", "--model", "tiny", "--batch", "2", "--seq", "96", "--image",
              "56", "--steps", "2", "--layout", "packed", "--vision-attention", "grouped", "--ac-every", "2",
              "--profile", str(tmp_path / "prof"), "--trace")
    assert f["tokens per step"] == 2 * 96 and f["patches per image"] == 16
    assert f["vision patches encoded per step"] == 2 * 16
    assert f["layout"] == "packed" and f["vision attention"] == "grouped" and f["attention"] == "sdpa"
    assert f["tokens/s"] == pytest.approx(f["tokens per step"] / f["step s (median)"])
    assert 0 < f["LM params (B)"] < 0.02 and "MFU" not in f  # no peak FLOP/s known for a CPU
    assert f["activation checkpointing"] == "1 in 2 layers"
    # the profiled step: every op's self time in one category; the matmul FLOPs the profiler counted are of the
    # order of the model FLOPs (the tiny model is mostly its tied 152k-row LM head, applied to response tokens only)
    prof = json.loads((tmp_path / "prof" / "profile.json").read_text())
    assert sum(prof["categories"].values()) == pytest.approx(prof["busy_s"])
    assert 0 < prof["busy_s"] <= 1.05 * prof["wall_s"]
    assert prof["categories"]["matmul"] > 0 and prof["categories"]["optimizer"] > 0
    assert any(r["op"] in ("aten::mm", "aten::addmm") and r["category"] == "matmul" for r in prof["top ops"])
    assert 0.1 * f["TFLOP per step"] < prof["matmul TFLOP"] < 2 * f["TFLOP per step"]
    assert f["matmul share of busy"] == pytest.approx(prof["categories"]["matmul"] / prof["busy_s"])
    assert "| category | s | share of busy |" in (tmp_path / "prof" / "profile.md").read_text()
    import gzip

    with gzip.open(tmp_path / "prof" / "trace.json.gz") as f:  # a Chrome trace, gzipped
        trace = json.load(f)
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])


@pytest.mark.slow
def test_bench_rollout_hf_reports_tokens(tmp_path):
    f = bench("bench_rollout.py", tmp_path / "r.jsonl", "--backend", "hf", "--model", "tiny", "--prompts", "2",
              "--n", "2", "--max-tokens", "5", "--image", "56")
    assert f["prompts x n"] == "2 x 2" and f["HF generate tokens/s"] > 0
    assert f["HF generate tokens/s"] * f["HF generate s"] == pytest.approx(2 * 2 * 5)  # ignore_eos: all 5 tokens


@pytest.mark.slow
def test_bench_sync_hf_moves_every_parameter(tmp_path):
    from mm_gmpo.models import build_model, tiny_qwen2_5_vl_config

    f = bench("bench_sync.py", tmp_path / "r.jsonl", "--backend", "hf", "--model", "tiny", "--repeats", "2")
    m = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config())
    params = list(m.parameters())
    assert f["tensors"] == len(params)
    assert f["GB moved"] == pytest.approx(sum(p.numel() for p in params) * 4 / 1e9)  # fp32 on CPU
    assert f["sync s (median)"] > 0


STAND_IN_LOGPROBS = '''
"""A stand-in for vllm/logprobs.py: the two containers, with the calls the benchmark makes."""
from types import SimpleNamespace


class FlatLogprobs:
    def __init__(self):
        self.start_indices, self.end_indices, self.token_ids, self.logprobs = [], [], [], []


def create_sample_logprobs(flat):
    return FlatLogprobs() if flat else []


def append_logprobs_for_next_position(c, token_ids, logprobs, decoded, rank, num_logprobs):
    if isinstance(c, FlatLogprobs):
        c.start_indices.append(len(c.logprobs))
        c.token_ids += token_ids
        c.logprobs += logprobs
        c.end_indices.append(len(c.logprobs))
    else:
        c.append({t: SimpleNamespace(logprob=lp) for t, lp in zip(token_ids, logprobs)})
'''


@pytest.mark.slow
def test_bench_output_objects_reports_both_containers(tmp_path):
    (tmp_path / "logprobs.py").write_text(STAND_IN_LOGPROBS)
    f = bench("bench_output_objects.py", tmp_path / "r.jsonl", "--prompts", "2", "--n", "3", "--tokens", "20",
              "--logprobs-py", str(tmp_path / "logprobs.py"))
    assert f["sequences x tokens"] == "6 x 20"
    parts = ["dict + Logprob per token: fill s", "dict + Logprob per token: read s", "incremental detokenization s",
             "FlatLogprobs: fill s", "FlatLogprobs: read s", "one decode per response s"]
    assert all(f[k] > 0 for k in parts)
    assert f["host s saved per rollout"] == pytest.approx(sum(f[k] for k in parts[:3]) - sum(f[k] for k in parts[3:]))


@pytest.mark.slow
def test_activation_memory_adds_up(tmp_path):
    """Bytes autograd saves per token (decoder layer) and per patch (vision block) in bf16, and the activation
    memory for each checkpoint_every: checkpointed layers keep their input only, the others everything."""
    f = bench("activation_memory.py", tmp_path / "r.jsonl", "--model", "tiny", "--tokens", "1000", "--patches",
              "300", "--sample", "64", "--every", "1,2,0")
    text, vis = f["saved KB per token per decoder layer (bf16)"] * 1e3, f["saved KB per patch per vision block (bf16)"] * 1e3
    h, inter = 64, 128  # tiny_qwen2_5_vl_config: hidden 64, MLP 128 (vision: hidden 32, MLP 64)
    assert text >= 2 * (3 * inter + 2 * h)  # at least the MLP's gate, up and act(gate)*up, and q and o inputs
    assert vis >= 2 * (3 * 64 + 2 * 32)
    none = f["activations GiB, no checkpointing"] * 2**30
    assert none == pytest.approx(2 * text * 1000 + 2 * vis * 300)
    every1 = f["activations GiB, checkpoint_every=1 (2/2 layers, 2/2 blocks recomputed)"] * 2**30
    assert every1 == pytest.approx(2 * 2 * h * 1000 + 2 * 2 * 32 * 300)  # inputs only, bf16
    every2 = f["activations GiB, checkpoint_every=2 (1/2 layers, 1/2 blocks recomputed)"] * 2**30
    assert every2 == pytest.approx((text + 2 * h) * 1000 + (vis + 2 * 32) * 300)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [[], ["model.lora.rank=4"], ["model.freeze_vision=true"],
                                       ["model.lora.rank=4", "model.lora.vision=true"], ["optim.name=adamw_8bit"],
                                       ["optim.name=adamw_bf16"], ["optim.name=adamw_bf16", "model.lora.rank=4"]],
                         ids=str)
def test_memory_plan_counts_what_one_step_allocates(overrides, own_process_group):
    """benchmarks/memory_plan.py's parameter, gradient and optimizer bytes equal the tensor bytes a real FSDP2
    step of the tiny model holds (one process, CPU), for full fine-tuning, LoRA and a frozen vision tower."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from memory_plan import plan

    from mm_gmpo import distributed
    from mm_gmpo.config import load_config
    from mm_gmpo.lora import add_lora
    from mm_gmpo.models import build_model, tiny_qwen2_5_vl_config
    from mm_gmpo.optim import build_optimizer, master_dtype
    from mm_gmpo.policy import Policy, collate

    cfg = load_config(None, ["model.path=tiny-random", "rollout.backend=hf", *overrides])
    p = plan(cfg, gpus=1, gpu_gib=80, unit_bytes=(1000.0, 1000.0))
    model = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=master_dtype(cfg.optim.name),
                        seed=0)
    lo = cfg.model.lora
    if lo.rank:
        add_lora(model, rank=lo.rank, alpha=2 * lo.rank, vision=lo.vision)
    policy = Policy(model)
    distributed.parallelize(policy, param_dtype=None, activation_checkpointing=False,
                            freeze_vision=cfg.model.freeze_vision)
    opt = build_optimizer(policy, lr=1e-3, name=cfg.optim.name)

    def nbytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):  # torchao's 8-bit state
            return sum(nbytes(getattr(t, a)) for a in t.__tensor_flatten__()[0])
        return t.numel() * t.element_size()

    ids = torch.randint(0, 1000, (2, 12))
    b = collate(ids[:, :8].tolist(), ids[:, 8:].tolist(), pad_id=0)
    lp, _ = policy(b)
    lp.sum().backward()
    params = sum(nbytes(x) for x in policy.parameters())
    grads = sum(nbytes(x.grad) for x in policy.parameters() if x.grad is not None)
    opt.step()
    state = sum(nbytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    u = p["update"]
    w = "bf16" if cfg.optim.name == "adamw_bf16" else "fp32"
    assert params == u[f"parameters ({w}, sharded)"]
    assert grads == u[f"gradients ({w}, sharded)"]
    assert state == u[f"optimizer ({cfg.optim.name} state)"]
    if cfg.optim.name == "adamw_8bit":
        assert state < params * 0.7  # ~2 bytes per parameter instead of 8
    if cfg.optim.name == "adamw_bf16" and not lo.rank:
        assert state == 3 * params and grads == params  # bf16 m, v, compensation; bf16 gradients
    if lo.rank:
        assert grads < params / 20  # adapters only


@pytest.mark.slow
def test_bench_step_reports_stages_pixels_and_balance(tmp_path):
    """bench_step.py: a geo3k-shaped run on 2 ranks; n=2 samples per prompt share one copy of each picture (the
    old-log-prob pass and the one update each get it once: a copy per sample would add as much again), the warm
    reward pool leaves step 1 no start-up to wait for, and the ranks' token counts are reported."""
    f = bench("bench_step.py", tmp_path / "r.jsonl", "--steps", "2", "--n", "2", "--prompts", "2", "--max-tokens", "4")
    assert f["steps (steady)"] == "2 (1)" and f["prompts x n"] == "2 x 2"
    held = f["pixel MB held per step (each picture once)"]
    assert held > 0 and f["pixel MB given to the forwards per step"] == pytest.approx(2 * held)
    assert f["pixel MB a copy per sample would add"] == pytest.approx(2 * held)
    assert f["rank token imbalance, after balancing"] <= f["rank token imbalance, unbalanced (max / mean per mini-batch)"]
    assert f["reward wait s, step 1"] < 1.0 and f["update s (median)"] > 0
