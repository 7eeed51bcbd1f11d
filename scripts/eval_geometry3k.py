"""Geometry3K evaluation: greedy pass@1 or mean@k / pass@k, per-problem-type tables, traceable generations.

    python scripts/eval_geometry3k.py --model PATH [--split test] [--backend hf] [--n K --temperature T]
    python scripts/eval_geometry3k.py --model tiny-random --backend oracle --limit 50    # pipeline check: 100%

Writes <out>/generations.jsonl (one line per sample), results.json and results.md. Re-running with the same
--out resumes: problems already in generations.jsonl are skipped.
"""

from __future__ import annotations

import argparse

from mm_gmpo.data import geometry3k_prompts, load_geometry3k
from mm_gmpo.data.processing import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from mm_gmpo.evaluation import add_eval_args, run_cli


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(ap)
    ap.add_argument("--split", default="test", help="test (601) or val (300) of the committed copy")
    ap.add_argument("--source", default=None, help="another Geometry3K source (Inter-GPS folder, parquet, hub name)")
    ap.add_argument("--show-choices", action="store_true", help="list the choices in the prompt (Inter-GPS style)")
    ap.add_argument("--min-pixels", type=int, default=DEFAULT_MIN_PIXELS)
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    args = ap.parse_args()
    ds = load_geometry3k(args.source, args.split) if args.source else load_geometry3k(split=args.split)
    prompts = list(geometry3k_prompts(ds, template=args.template or "think_boxed", show_choices=args.show_choices))
    run_cli(args, prompts, f"geometry3k/{args.split}", min_pixels=args.min_pixels, max_pixels=args.max_pixels)


if __name__ == "__main__":
    main()
