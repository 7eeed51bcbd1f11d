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

from mm_gmpo.models import model_config, tiny_qwen2_5_vl_config


def config_for(name: str):
    """'tiny', a bundled config name (qwen2_5_vl_7b, qwen3_vl_8b, qwen3_vl_30b_a3b, qwen2_vl_2b, ...) or a config.json path."""
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
