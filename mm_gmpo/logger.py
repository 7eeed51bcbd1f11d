"""Metrics: console, ``metrics.jsonl``, TensorBoard, W&B (when installed and asked for), and a reward plot."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path


class MetricsLogger:
    """Rank 0 writes; other ranks get a logger that does nothing."""

    def __init__(self, out_dir: str | Path, *, enabled: bool, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "mm_gmpo", run_name: str = "", config: dict | None = None):
        self.enabled = enabled
        self.out = Path(out_dir)
        self._tb = self._wandb = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "samples.jsonl"):  # a resumed run appends; never onto a half-written line
            drop_torn_tail(self.out / name)
        self._jsonl = open(self.out / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed: skipping TensorBoard logs")
        if wandb:
            try:
                import wandb as wb

                self._wandb = wb.init(project=wandb_project, name=run_name or self.out.name, config=config or {})
            except ImportError:
                print("wandb is not installed (pip install -e '.[wandb]'): skipping W&B")

    def rewind(self, step: int) -> None:
        """A run resumed from the checkpoint of ``step``: forget what was logged after it.

        A run killed between checkpoints had logged the steps it will now redo; their rows leave metrics.jsonl
        and samples.jsonl, and TensorBoard purges its events past ``step`` (SummaryWriter purge_step), so every
        step appears once.
        """
        if not self.enabled:
            return
        self._jsonl.close()
        for name in ("metrics.jsonl", "samples.jsonl"):
            drop_rows_after(self.out / name, step)
        self._jsonl = open(self.out / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb.close()
            self._tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=step + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def samples(self, step: int, records: list[dict]) -> None:
        """A few generations per eval (prompt id, image count, answer, reward) into ``samples.jsonl``."""
        if not self.enabled or not records:
            return
        with open(self.out / "samples.jsonl", "a") as f:
            for rec in records:
                f.write(json.dumps({"step": step, **rec}) + "\n")
        if self._wandb is not None:
            import wandb as wb

            cols = ["step", *records[0]]
            self._wandb.log({"eval/samples": wb.Table(columns=cols, data=[[step, *r.values()] for r in records])},
                            step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON-lines file (metrics, generations); a torn line (killed mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


read_metrics = read_jsonl


def drop_torn_tail(path: str | Path) -> None:
    """Cut a partial last line (a kill mid-write) so that appended records start on a line of their own."""
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def drop_rows_after(path: str | Path, step: int) -> int:
    """Remove the records with ``"step" > step`` from a JSON-lines file (atomically); returns how many went."""
    path = Path(path)
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    keep = [ln for ln in lines if not _after(ln, step)]
    if len(keep) == len(lines):
        return 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)
    return len(lines) - len(keep)


def _after(line: str, step: int) -> bool:
    try:
        return int(json.loads(line).get("step", -1)) > step
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return False


STAGES = ("prompts", "rollout", "reward", "old_logprob", "update", "weight_sync", "eval")


def stage_seconds(rows: list[dict]) -> tuple[list[int], dict[str, list[float]]]:
    """Steps and each stage's ``timing/<stage>_s`` per step (0 where a step did not run it, e.g. eval), for the
    stages that ran at all."""
    rows = [r for r in rows if "timing/step_s" in r]
    steps = [r["step"] for r in rows]
    series = {s: [float(r.get(f"timing/{s}_s", 0.0)) for r in rows] for s in STAGES}
    return steps, {s: v for s, v in series.items() if any(v)}


def plot_training(metrics_path: str | Path, out_png: str | Path,
                  keys: tuple[str, ...] = ("reward/mean", "eval/accuracy", "actor/entropy",
                                            "ratio/token_log_ratio_max")) -> Path | None:
    """Plot the chosen metrics against step (one panel each), and where the time of each step went (stacked
    stage seconds), into a PNG; None if there is nothing to plot."""
    rows = read_metrics(metrics_path)
    keys = tuple(k for k in keys if any(k in r for r in rows))
    steps, stages = stage_seconds(rows)
    if not rows or not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(keys) + bool(stages)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), squeeze=False)
    if stages:
        ax = axes[0][-1]
        ax.stackplot(steps, *stages.values(), labels=list(stages), alpha=0.8)
        ax.set_title("seconds per step, by stage")
        ax.set_xlabel("step")
        ax.legend(fontsize=6, loc="upper left")
        ax.grid(alpha=0.3)
    for ax, k in zip(axes[0][:len(keys)], keys, strict=True):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker=".", lw=1, alpha=0.5 if len(pts) > 20 else 1.0)
        if len(pts) > 20:  # a 10-step running mean makes the trend readable
            w = 10
            smooth = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
            ax.plot(xs, smooth, lw=2, color="C1", label="10-step mean")
            ax.legend(fontsize=7)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
