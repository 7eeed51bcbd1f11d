"""The whole training step on CPU, geo3k-shaped: where each step's time goes, how long it waits for rewards, how
much pixel data it holds against the distinct images, and how even the ranks' work is (issue 20's baseline).

    python benchmarks/bench_step.py [--steps 4] [--ranks 2] [--n 5] [--max-tokens 32] [key=value ...]

Runs ``torchrun --nproc_per_node RANKS scripts/train_mm.py --config configs/geo3k_smoke.yaml`` (a random tiny
Qwen2.5-VL on the bundled Geometry3K val split: real diagrams and processor) for STEPS steps with n samples per
prompt and 2 reward worker processes, then reports medians over the steady-state steps (step 1 pays one-off
costs and is reported apart): seconds per stage, reward wait in step 1 and after, pixel MB held vs distinct per
step, and the ranks' token imbalance (max over mean). Plumbing and proportions, not GPU speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import report

from mm_gmpo.logger import steady_medians

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (trainer.rollout_batch_size)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default=None, help="results.jsonl to append to")
    ap.add_argument("overrides", nargs="*", help="more trainer overrides, key=value")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
               str(ROOT / "scripts" / "train_mm.py"), "--config", str(ROOT / "configs" / "geo3k_smoke.yaml"),
               f"trainer.output_dir={run}", f"trainer.total_steps={args.steps}", f"rollout.n={args.n}",
               f"trainer.rollout_batch_size={args.prompts}", f"trainer.mini_batch_size={args.prompts}",
               f"rollout.max_tokens={args.max_tokens}", "trainer.reward_workers=2", "logging.console_every=0",
               *args.overrides]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if r.returncode != 0:
            sys.exit(f"the training run failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows, steady, median = steady_medians(rows)

    def med(key: str) -> float:
        v = median(key)
        return float("nan") if v is None else v

    figures = {"steps (steady)": f"{len(rows)} ({len(steady)})", "ranks": args.ranks, "prompts x n": f"{args.prompts} x {args.n}"}
    for stage in ("prompts", "rollout", "reward", "old_logprob", "update", "weight_sync", "step"):
        figures[f"{stage} s (median)"] = med(f"timing/{stage}_s")
    figures["reward wait s, step 1"] = rows[0].get("timing/reward_s", float("nan"))
    figures["pixel MB held per step"] = med("perf/pixel_mb_held")
    figures["pixel MB of distinct images"] = med("perf/pixel_mb_distinct")
    figures["rank token imbalance (max / mean)"] = med("perf/rank_token_imbalance")
    report("bench_step", figures, torch.device("cpu"), args.out)


if __name__ == "__main__":
    main()
