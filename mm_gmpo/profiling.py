"""Where a stretch of training time goes: a block run under the torch profiler, each op's self time in a category.

Used by ``benchmarks/bench_update.py --profile`` and the trainer's ``trainer.profile_step``. The categories answer
the question that comes before any optimisation: is the time in the matmuls (then the model FLOPs bound it), in
attention, in memory-bound elementwise ops, copies, the optimizer or FSDP's gathers, or is the GPU idle waiting
for the host (``busy_s`` well under ``wall_s``)?
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_scaled_mm"}
CONV_OPS = {"aten::convolution", "aten::_convolution", "aten::cudnn_convolution", "aten::convolution_backward",
            "aten::mkldnn_convolution", "aten::slow_conv3d_forward", "aten::_slow_conv2d_forward"}
COPY_OPS = {"aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous", "aten::cat",
            "aten::index_select", "aten::index", "aten::index_put_", "aten::masked_scatter", "aten::fill_",
            "aten::zero_", "aten::zeros", "aten::empty", "aten::empty_strided"}
CATEGORIES = ("matmul", "attention", "convolution", "compiled (fused) kernels", "optimizer", "FSDP gather/reduce",
              "copy/cast/index", "other ops (elementwise, norms, softmax)")


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
    if "CompiledFxGraph" in name or "CompiledFunction" in name or name.startswith("triton"):
        return "compiled (fused) kernels"
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


def _own_device_us(ev) -> float:
    """Device time of the kernels this event launched itself (its children's are theirs). A ``record_function``
    range also gets its GPU-side twin (same name, spanning every kernel inside it, gaps included) as a "kernel":
    not counted, or the range would claim the idle time between its children's kernels."""
    if ev.is_async:
        return 0.0
    return float(sum(k.duration for k in ev.kernels if not (ev.is_user_annotation and k.name == ev.name)))


@contextlib.contextmanager
def profiled(device: torch.device, *, enabled: bool = True, top: int = 15, trace: str | Path | None = None):
    """Run the ``with`` block under the torch profiler and say where its time went: the yielded dict is filled on
    exit (left empty when not ``enabled``, which costs nothing).

    Every op's and ``record_function`` range's *self* time (the device kernels it launched itself on a GPU, its CPU
    time outside child ops on a CPU) goes to one of :data:`CATEGORIES`, so kernels launched from Python inside a
    range (``torch.compile``'s Triton kernels) count too;
    ``busy_s`` is their sum and ``wall_s`` the block's wall time, so on a GPU ``1 - busy/wall`` is the time the
    GPU sat idle waiting for the host (launch-bound work, host syncs). ``matmul TFLOP/s`` divides the FLOPs the
    profiler counts for matmuls by their own time: the efficiency of the matmuls themselves. ``trace``: also write
    a Chrome trace (gzip if the name ends in .gz) for perfetto / chrome://tracing.
    """
    out: dict = {}
    if not enabled:
        yield out
        return
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, with_flops=True) as prof:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        yield out
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    out.update(_summarize(prof, wall, cuda, top, trace))


def _summarize(prof, wall: float, cuda: bool, top: int, trace: str | Path | None) -> dict:
    per_cat = dict.fromkeys(CATEGORIES, 0.0)
    per_op: dict[str, list] = {}
    mm_flops = 0
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CPU:  # device events: counted in the op that launched them
            continue
        us = _own_device_us(ev) if cuda else ev.self_cpu_time_total
        cat = _category(ev)
        per_cat[cat] += us / 1e6
        row = per_op.setdefault(ev.name, [0, 0.0, cat])
        row[0] += 1
        row[1] += us / 1e6
        if cat == "matmul":
            mm_flops += ev.flops or 0
    busy = sum(per_cat.values())
    if trace is not None:
        Path(trace).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))  # gzipped by torch when the name ends in .gz
    ops = sorted(per_op.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "clock": "device (CUDA kernels)" if cuda else "CPU",
        "wall_s": wall, "busy_s": busy,
        "categories": per_cat,
        "matmul TFLOP": mm_flops / 1e12,
        "matmul TFLOP/s": mm_flops / per_cat["matmul"] / 1e12 if per_cat["matmul"] > 0 else 0.0,
        "top ops": [{"op": k, "calls": c, "s": s, "category": cat} for k, (c, s, cat) in ops],
    }


def profile_markdown(p: dict) -> str:
    """The breakdown of :func:`profiled` as two markdown tables."""
    lines = [f"Profiled step: {p['wall_s']:.3f} s wall, {p['busy_s']:.3f} s busy ({p['clock']} self time, "
             f"{p['busy_s'] / p['wall_s']:.0%} of wall); matmuls {p['matmul TFLOP']:.3g} TFLOP at "
             f"{p['matmul TFLOP/s']:.3g} TFLOP/s of their own time.", "",
             "| category | s | share of busy |", "|---|---|---|"]
    for k, v in p["categories"].items():
        lines.append(f"| {k} | {v:.4f} | {v / p['busy_s']:.1%} |" if p["busy_s"] else f"| {k} | {v:.4f} | - |")
    lines += ["", "| op (self time) | calls | s | category |", "|---|---|---|---|"]
    lines += [f"| `{r['op']}` | {r['calls']} | {r['s']:.4f} | {r['category']} |" for r in p["top ops"]]
    return "\n".join(lines)


def write_profile(p: dict, stem: str | Path, is_main: bool = True) -> None:
    """``stem``.md and ``stem``.json (on the main rank) and the markdown printed."""
    if not is_main:
        return
    import json

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = profile_markdown(p)
    stem.with_suffix(".json").write_text(json.dumps(p, indent=1))
    stem.with_suffix(".md").write_text(md + "\n")
    print(md)
