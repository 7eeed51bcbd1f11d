"""Shared pieces of the GPU benchmarks: random-weight models from the real configs, image prompts,
and one result format (a JSON line per run in ``results.jsonl``, printed as a markdown table).

Models are random-initialised from ``mm_gmpo/assets/qwen2_5_vl/configs`` (speed only, never accuracy); ``tiny``
is the CPU test model, so every benchmark also runs (slowly, for its format) on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from mm_gmpo.policy import model_config, tiny_qwen2_5_vl_config


def config_for(name: str):
    """'tiny', 'qwen2_5_vl_3b' or 'qwen2_5_vl_7b' (or a config.json path)."""
    return tiny_qwen2_5_vl_config() if name == "tiny" else model_config(name)


def image(side: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB test image (noise, so no encoder or cache can shortcut it)."""
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(side, side, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


def image_prompts(n: int, side: int, processor, *, question_tokens: int = 32):
    """n encoded prompts, each one ``side`` x ``side`` image (kept at that size) plus a short question."""
    from mm_gmpo.data.processing import encode_prompts
    from mm_gmpo.data.prompts import Prompt, build_messages

    q = "Describe the image in detail. " * max(1, question_tokens // 6)
    prompts = [Prompt(id=f"bench/{i}", task="exact", messages=build_messages(q, 1, "plain"), images=[image(side, i)],
                      ground_truth="") for i in range(n)]
    enc, _ = encode_prompts(prompts, processor, max_prompt_length=1 << 20, min_pixels=side * side,
                            max_pixels=side * side)
    return enc


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    for mod in ("transformers", "vllm", "flash_attn"):
        with contextlib.suppress(Exception):
            env[mod] = __import__(mod).__version__
    return env


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        self._sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.s = time.perf_counter() - self.t0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def report(name: str, figures: dict, device: torch.device, out: str | Path | None = None) -> dict:
    """Print a markdown table of the figures and append the run (command, environment, figures) as a JSON line."""
    rec = {"benchmark": name, "command": " ".join(["python", *sys.argv]), "time": time.strftime("%Y-%m-%d %H:%M"),
           "env": environment(device), "figures": figures}
    print(f"\n{name}  ({rec['env'].get('gpu', rec['env']['device'])}, torch {rec['env']['torch']})")
    print("| figure | value |\n|---|---|")
    for k, v in figures.items():
        print(f"| {k} | {v:,.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    path = Path(out or os.environ.get("MM_GMPO_BENCH_OUT", Path(__file__).parent / "results.jsonl"))
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


# ---------------------------------------------------------------- where a step's time goes (torch profiler)

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_scaled_mm"}
CONV_OPS = {"aten::convolution", "aten::_convolution", "aten::cudnn_convolution", "aten::convolution_backward",
            "aten::mkldnn_convolution", "aten::slow_conv3d_forward", "aten::_slow_conv2d_forward"}
COPY_OPS = {"aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous", "aten::cat",
            "aten::index_select", "aten::index", "aten::index_put_", "aten::masked_scatter", "aten::fill_",
            "aten::zero_", "aten::zeros", "aten::empty", "aten::empty_strided"}
CATEGORIES = ("matmul", "attention", "convolution", "optimizer", "FSDP gather/reduce", "copy/cast/index",
              "other ops (elementwise, norms, softmax)")


def _category(ev) -> str:
    """One of CATEGORIES for a profiler event: by an enclosing optimizer or FSDP region first, then by op name."""
    p = ev
    while p is not None:
        if p.name.startswith("Optimizer.step"):
            return "optimizer"
        if p.name.startswith("FSDP::") or "nccl" in p.name or p.name.startswith("c10d::"):
            return "FSDP gather/reduce"
        p = p.cpu_parent
    name = ev.name
    if name in MATMUL_OPS:
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name \
            or "cudnn_attention" in name:
        return "attention"
    if name in CONV_OPS:
        return "convolution"
    if name in COPY_OPS:
        return "copy/cast/index"
    return "other ops (elementwise, norms, softmax)"


def profile_breakdown(fn, device: torch.device, *, top: int = 15, trace: str | Path | None = None) -> dict:
    """Run ``fn()`` once under the torch profiler and say where its time went.

    Every op's *self* time (device kernels on a GPU, CPU time on a CPU) goes to one of :data:`CATEGORIES`;
    ``busy_s`` is their sum and ``wall_s`` the call's wall time, so on a GPU ``1 - busy/wall`` is the time the
    GPU sat idle waiting for the host (launch-bound work, host syncs). ``matmul TFLOP/s`` divides the FLOPs the
    profiler counts for matmuls by their own time: the efficiency of the matmuls themselves. ``trace``: also write
    a Chrome trace (gzip if the name ends in .gz) for perfetto / chrome://tracing.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, with_flops=True) as prof, Timer(device) as t:
        fn()
    per_cat = dict.fromkeys(CATEGORIES, 0.0)
    per_op: dict[str, list] = {}
    mm_flops = 0
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CPU or ev.is_user_annotation:
            continue
        us = ev.self_device_time_total if cuda else ev.self_cpu_time_total
        cat = _category(ev)
        per_cat[cat] += us / 1e6
        row = per_op.setdefault(ev.name, [0, 0.0, cat])
        row[0] += 1
        row[1] += us / 1e6
        if cat == "matmul":
            mm_flops += ev.flops or 0
    busy = sum(per_cat.values())
    if trace is not None:
        trace = Path(trace)
        trace.parent.mkdir(parents=True, exist_ok=True)
        if trace.suffix == ".gz":
            import gzip
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                raw = Path(tmp) / "trace.json"
                prof.export_chrome_trace(str(raw))
                with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
                    dst.write(src.read())
        else:
            prof.export_chrome_trace(str(trace))
    ops = sorted(per_op.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "clock": "device (CUDA kernels)" if cuda else "CPU",
        "wall_s": t.s, "busy_s": busy,
        "categories": {k: v for k, v in per_cat.items()},
        "matmul TFLOP": mm_flops / 1e12,
        "matmul TFLOP/s": mm_flops / per_cat["matmul"] / 1e12 if per_cat["matmul"] > 0 else 0.0,
        "top ops": [{"op": k, "calls": c, "s": s, "category": cat} for k, (c, s, cat) in ops],
    }


def profile_markdown(p: dict) -> str:
    """The breakdown of :func:`profile_breakdown` as two markdown tables."""
    lines = [f"Profiled step: {p['wall_s']:.3f} s wall, {p['busy_s']:.3f} s busy ({p['clock']} self time, "
             f"{p['busy_s'] / p['wall_s']:.0%} of wall); matmuls {p['matmul TFLOP']:.2f} TFLOP at "
             f"{p['matmul TFLOP/s']:.1f} TFLOP/s of their own time.", "",
             "| category | s | share of busy |", "|---|---|---|"]
    for k, v in p["categories"].items():
        lines.append(f"| {k} | {v:.4f} | {v / p['busy_s']:.1%} |" if p["busy_s"] else f"| {k} | {v:.4f} | - |")
    lines += ["", "| op (self time) | calls | s | category |", "|---|---|---|---|"]
    lines += [f"| `{r['op']}` | {r['calls']} | {r['s']:.4f} | {r['category']} |" for r in p["top ops"]]
    return "\n".join(lines)
