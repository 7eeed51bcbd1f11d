"""The whole training step on CPU, geo3k-shaped: where each step's time goes, how long it waits for rewards, how
much pixel data it holds against the distinct images, and how even the ranks' work is (issue 20's baseline).

    python benchmarks/bench_step.py [--steps 4] [--ranks 2] [--n 5] [--max-tokens 32] [key=value ...]

Runs ``torchrun --nproc_per_node RANKS scripts/train_mm.py --config configs/geo3k_smoke.yaml`` (a random tiny
Qwen2.5-VL on the bundled Geometry3K val split: real diagrams and processor) for STEPS steps with n samples per
prompt and 2 reward worker processes, then reports medians over the steady-state steps (step 1 pays one-off
costs and is reported apart): seconds per stage, the reward wait (step 1 and after) against the scoring's own time,
pixel MB held and given to the forwards per step (and what a copy per sample would add), and the ranks' token
imbalance (the busiest rank's tokens over the mean, per mini-batch) with and without moving prompt groups.
Plumbing and proportions, not GPU speed. Spread lengths: ``--prompts 8 data.max_pixels=200704`` (diagrams up to
448x448: prompts of 100 to 1000 tokens).
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
    ap.add_argument("--reward-ms", type=float, default=0.0,
                    help="score with a reward function that takes this long per response (a slow verifier or a "
                         "reward model), to show scoring beside the old-log-prob pass; 0: the built-in verifier")
    ap.add_argument("--out", default=None, help="results.jsonl to append to")
    ap.add_argument("overrides", nargs="*", help="more trainer overrides, key=value")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        if args.reward_ms > 0:
            slow = Path(tmp) / "slow_reward.py"
            slow.write_text("import time\n\n\ndef reward(response, ground_truth, delay_s=0.0):\n"
                            "    time.sleep(delay_s)\n    return float(response.strip() == ground_truth)\n")
            args.overrides += [f"algorithm.reward_function={slow}:reward",
                               f"algorithm.reward_kwargs={{delay_s: {args.reward_ms / 1000}}}"]
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
    for stage in ("prompts", "rollout", "balance", "reward", "old_logprob", "update", "weight_sync", "step"):
        figures[f"{stage} s (median)"] = med(f"timing/{stage}_s")
    figures["reward wait s, step 1"] = rows[0].get("timing/reward_s", float("nan"))
    figures["reward busy s (median; runs beside sleep and old log-probs)"] = med("timing/reward_busy_s")
    figures["pixel MB held per step (each picture once)"] = med("perf/pixel_mb_held")
    figures["pixel MB given to the forwards per step"] = med("perf/pixel_mb_moved")
    figures["pixel MB a copy per sample would add"] = med("perf/pixel_mb_dedup_saved")
    figures["micro-batches per update (median)"] = med("actor/micro_batches")
    figures["rank token imbalance, unbalanced (max / mean per mini-batch)"] = med("perf/rank_token_imbalance_unbalanced")
    figures["rank token imbalance, after balancing"] = med("perf/rank_token_imbalance")
    figures["prompt groups moved per step (median)"] = med("perf/balance_moved_groups")
    report("bench_step", figures, torch.device("cpu"), args.out)


if __name__ == "__main__":
    main()
