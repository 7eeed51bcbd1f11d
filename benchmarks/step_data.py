"""A Geometry3K-shaped training file for GPU step benchmarks, written where the benchmark runs: N prompts, each a
``side`` x ``side`` noise picture (no two alike, so no cache shortcuts it) and a question with a numeric answer,
as ``data.dataset=files`` reads it. The device machine then needs no copy of the 27 MB Geometry3K folders.

    python benchmarks/step_data.py --out /tmp/step_data --prompts 64 --side 512
    ... scripts/train_mm.py data.dataset=files data.train_files=/tmp/step_data/train.jsonl ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import image


def write(out: Path, prompts: int, side: int) -> Path:
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(prompts):
        image(side, seed=i).save(out / "images" / f"{i}.png")
        rows.append({"id": f"step/{i}", "images": [f"images/{i}.png"], "answer": str(10 + i),
                     "problem": "<image> In the figure, find the measure of angle x in degrees. Reason step by step."})
    path = out / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--side", type=int, default=512, help="picture side in pixels (geo3k config: 512 x 512 at least)")
    args = ap.parse_args()
    print(write(Path(args.out), args.prompts, args.side))


if __name__ == "__main__":
    main()
