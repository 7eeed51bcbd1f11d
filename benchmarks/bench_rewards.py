"""Reward throughput on typical responses: 1,024 Geometry3K + MATH500 answers, correct / wrong / letter / tagged.

    python benchmarks/bench_rewards.py [--n 1024] [--workers 2] [--data-root data]
Prints items/s for the in-process path and the worker-pool path (the pool's start-up is reported separately).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from mm_gmpo.rewards import score_batch
from mm_gmpo.rewards.batch import _pool


def typical_items(n: int, data_root: Path, seed: int = 0):
    rng = random.Random(seed)
    geo = []
    for f in sorted((data_root / "geometry3k" / "test").glob("*/data.json")):
        d = json.loads(f.read_text())
        geo.append(d)
    math = [json.loads(line) for line in (data_root / "math" / "math500_test.jsonl").read_text().splitlines()]
    items = []
    for i in range(n):
        if i % 2 == 0:
            d = rng.choice(geo)
            gold = "ABCD".index(d["answer"])
            pick = gold if rng.random() < 0.5 else rng.randrange(4)
            style = rng.randrange(4)
            body = "Let me reason about the diagram step by step. " * rng.randint(5, 40)
            ans = [d["choices"][pick], "ABCD"[pick], f"{d['precise_value'][pick]:.2f}" if isinstance(d["precise_value"][pick], float) else d["choices"][pick], d["choices"][pick]][style]
            resp = f"<think>{body}</think> The answer is \\boxed{{{ans}}}" if style != 3 else f"{body}<answer>{ans}</answer>"
            items.append((resp, d["answer"], "geometry3k", d["choices"], d["precise_value"]))
        else:
            d = rng.choice(math)
            ans = d["answer"] if rng.random() < 0.5 else rng.choice(math)["answer"]
            body = "We compute carefully. " * rng.randint(5, 40)
            items.append((f"<think>{body}</think> So the result is $\\boxed{{{ans}}}$.", d["solution"], "math", None, None))
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[1] / "data")
    args = ap.parse_args()
    items = typical_items(args.n, args.data_root)
    cols = list(zip(*items, strict=True))
    kw = dict(task=list(cols[2]), choices=list(cols[3]), choice_values=list(cols[4]))
    for workers in (0, args.workers):
        if workers:
            t0 = time.perf_counter()
            _pool(workers)
            print(f"pool start-up ({workers} workers): {time.perf_counter() - t0:.2f} s")
        t0 = time.perf_counter()
        _, m = score_batch(list(cols[0]), list(cols[1]), workers=workers, **kw)
        dt = time.perf_counter() - t0
        print(f"workers={workers}: {args.n} items in {dt:.2f} s ({args.n / dt:.0f} items/s), "
              f"accuracy {m['reward/accuracy']:.3f}, killed {m['reward/killed_for_time']:.0f}")


if __name__ == "__main__":
    main()
