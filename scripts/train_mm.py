"""Train with GMPO (or GRPO). Launch with torchrun; with no arguments it runs the built-in default (configs/tiny.yaml).

    torchrun --nproc_per_node 2 scripts/train_mm.py
    torchrun --nproc_per_node 8 scripts/train_mm.py --config configs/geo3k_qwen2_5_vl_7b_gmpo.yaml optim.lr=2e-6

Overrides are dotted keys (`python -m mm_gmpo.config` lists them all). Config errors are reported before any
model is loaded. A user error (config, data, model path, reward function, checkpoint) prints one line, once (rank
0), exits with code 2, and leaves no run folder behind if the run never got to its first step; under torchrun the
same line is also the root cause in torchrun's failure summary (torchrun itself exits with 1).
`--check` stops after those checks (config, model and data paths, the reward function's probe): exit 0 or 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from mm_gmpo.checkpoint import CheckpointError
from mm_gmpo.config import ConfigError, load_config
from mm_gmpo.data.prompts import DataError
from mm_gmpo.inputs import check_inputs
from mm_gmpo.logger import quiet_dependency_warnings
from mm_gmpo.trainer import train

DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def user_error(kind: str, error: Exception) -> int:
    """One line on rank 0 only; under torchrun also torchrun's error file, so its failure summary shows this line
    as the root cause instead of a pointer to its docs. Returns the exit code, 2."""
    line = f"{kind} error: {error}"
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with open(error_file, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                  "timestamp": str(int(time.time()))}}}, f)
    return 2


def remove_unstarted(out: Path) -> None:
    """Remove a run folder this run created but never logged a step or a checkpoint into (rank 0)."""
    if os.environ.get("RANK", "0") != "0" or not out.is_dir():
        return
    metrics = out / "metrics.jsonl"
    if (metrics.exists() and metrics.stat().st_size) or any((out / "checkpoints").glob("step_*")):
        return
    shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT), help="experiment YAML (default: configs/tiny.yaml)")
    ap.add_argument("--check", action="store_true", help="check config, model and data paths and the reward "
                    "function, then stop (exit 0 or 2); nothing is written")
    ap.add_argument("overrides", nargs="*", help="key.sub=value")
    args = ap.parse_args()
    quiet_dependency_warnings()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return user_error("config", e)
    out = Path(cfg.trainer.output_dir)
    existed = out.exists()
    try:
        if args.check:
            check_inputs(cfg)
            print("check passed: config, model and data paths, reward function")
            return 0
        train(cfg)
    except (ConfigError, DataError, CheckpointError) as e:  # config, data, reward function, checkpoint: one line
        if not existed:
            remove_unstarted(out)
        kind = "data" if isinstance(e, DataError) else "checkpoint" if isinstance(e, CheckpointError) else "config"
        return user_error(kind, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
