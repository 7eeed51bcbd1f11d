"""Text-math evaluation with the same machinery as Geometry3K.

    python scripts/eval_math.py --model PATH --dataset math500 [--n 8 --temperature 0.6]

--dataset: math500, gsm8k, aime2024, aime2025 (committed under data/math/), or a .jsonl/.parquet path with
problem + answer/solution fields (AMC, Minerva, OlympiadBench files work the same way).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mm_gmpo.data import load_text_math, text_math_prompts
from mm_gmpo.evaluation import add_eval_args, run_cli


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(ap)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--levels", default="", help="comma-separated MATH levels to keep, e.g. 3,4,5")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")] if args.levels else None
    ds = load_text_math(args.dataset, levels=levels)
    name = Path(args.dataset).stem if Path(args.dataset).suffix else args.dataset
    prompts = list(text_math_prompts(ds, template=args.template or "qwen_math", dataset_name=name))
    run_cli(args, prompts, name, min_pixels=0, max_pixels=0)


if __name__ == "__main__":
    main()
