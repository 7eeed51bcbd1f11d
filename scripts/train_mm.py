"""Train with GMPO (or GRPO). Launch with torchrun; with no arguments it runs the built-in default (configs/tiny.yaml).

    torchrun --nproc_per_node 2 scripts/train_mm.py
    torchrun --nproc_per_node 8 scripts/train_mm.py --config configs/geo3k_qwen2_5_vl_7b_gmpo.yaml optim.lr=2e-6

Overrides are dotted keys (`python -m mm_gmpo.config` lists them all). Config errors are reported before any
model is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mm_gmpo.checkpoint import CheckpointError
from mm_gmpo.config import ConfigError, load_config, validate
from mm_gmpo.data.prompts import DataError
from mm_gmpo.trainer import train

DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT), help="experiment YAML (default: configs/tiny.yaml)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value")
    args = ap.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")),
                 local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    except (ConfigError, DataError, CheckpointError) as e:  # config, data, reward function, checkpoint: one line
        kind = {DataError: "data", CheckpointError: "checkpoint"}.get(type(e), "config")
        print(f"{kind} error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
