"""Convert Geometry3K (Inter-GPS folders, HF hiyouga/geometry3k parquet/hub, or unified parquet) into one parquet.

    python scripts/prepare_geometry3k.py --source data/geometry3k --split test --out data/geometry3k_test.parquet
    python scripts/prepare_geometry3k.py --source hiyouga/geometry3k --split train --out geo3k_train.parquet

The output has the unified schema of mm_gmpo.data.geometry3k (image bytes, problem, choices, answer text, answer
letter, id, problem types) and loads back with ``load_geometry3k(<parquet>, split)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mm_gmpo.data.geometry3k import REPO_GEOMETRY3K, load_geometry3k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(REPO_GEOMETRY3K), help="Inter-GPS root, parquet file/folder, or hub name")
    ap.add_argument("--split", default="test")
    ap.add_argument("--layout", default="auto", choices=["auto", "intergps", "hf", "unified"])
    ap.add_argument("--on-bad-sample", default="error", choices=["error", "skip"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    ds = load_geometry3k(args.source, args.split, layout=args.layout, on_bad_sample=args.on_bad_sample)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(args.out))
    print(f"wrote {len(ds)} problems to {args.out}")


if __name__ == "__main__":
    main()
