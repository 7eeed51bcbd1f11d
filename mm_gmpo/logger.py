"""Metrics: console, ``metrics.jsonl``, TensorBoard, W&B (when installed and asked for), and a reward plot."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path


def quiet_dependency_warnings() -> None:
    """Silence a dependency's import-time deprecation noise that says nothing about the run: torch warns once per
    process that torchao (imported by transformers' quantizers) registers enums as pytree constants."""
    import logging

    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


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

                # the run id lives in the run folder: a resumed run continues its W&B run instead of opening another
                id_file = self.out / "wandb_run_id.txt"
                run_id = id_file.read_text().strip() if id_file.exists() else wb.util.generate_id()
                id_file.write_text(run_id + "\n")
                self._wandb = wb.init(project=wandb_project, name=run_name or self.out.name, config=config or {},
                                      id=run_id, resume="allow")
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

    def samples(self, step: int, records: list[dict], split: str = "eval") -> None:
        """A few generations into ``samples.jsonl``, marked with ``split``: per eval (prompt id, image count,
        answer, reward) and per training step (prompt text, response, reward, advantage)."""
        if not self.enabled or not records:
            return
        records = [{"split": split, **r} for r in records]
        with open(self.out / "samples.jsonl", "a") as f:
            for rec in records:
                f.write(json.dumps({"step": step, **rec}) + "\n")
        if self._wandb is not None:
            import wandb as wb

            cols = ["step", *records[0]]
            self._wandb.log({f"{split}/samples": wb.Table(columns=cols, data=[[step, *r.values()] for r in records])},
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


STAGES = ("prompts", "rollout", "balance", "reward", "old_logprob", "update", "weight_sync", "eval")


def stage_seconds(rows: list[dict]) -> tuple[list[int], dict[str, list[float]]]:
    """Steps and each stage's ``timing/<stage>_s`` per step (0 where a step did not run it, e.g. eval), for the
    stages that ran at all."""
    rows = [r for r in rows if "timing/step_s" in r]
    steps = [r["step"] for r in rows]
    series = {s: [float(r.get(f"timing/{s}_s", 0.0)) for r in rows] for s in STAGES}
    return steps, {s: v for s, v in series.items() if any(v)}


# the panels of training.png: a title in words, the y-axis label, and the series drawn (metric key, legend label)
PANELS = (
    ("Training reward", "reward (mean over rollouts)", (("reward/mean", "reward"), ("reward/accuracy", "accuracy"))),
    ("Validation accuracy", "accuracy", (("eval/accuracy", "greedy / mean@k"),)),
    ("Policy entropy", "nats per token", (("actor/entropy", "entropy"),)),
    ("Token log-ratio range (log p_new - log p_old)", "log-ratio", (("ratio/token_log_ratio_max", "max"),
                                                                    ("ratio/token_log_ratio_min", "min"))),
    ("Clipped tokens", "fraction of tokens", (("ratio/clip_frac_upper", "upper (A > 0)"),
                                              ("ratio/clip_frac_lower", "lower (A < 0)"))),
    ("SAPO gate weight (its gradient scale; SAPO has no clip)", "mean 4 s (1 - s)",
     (("ratio/gate_weight_mean", "mean"),)),
    ("Response length", "tokens", (("rollout/response_len_mean", "mean"),)),
)


def plot_training(metrics_path: str | Path, out_png: str | Path) -> Path | None:
    """training.png: a grid of panels (reward and accuracy, validation accuracy, entropy, the token log-ratio's
    min and max, clip fractions, response length) and where each step's time went (stacked stage seconds), each
    with a title in words and a y-axis label; None if there is nothing to plot. Long series get a 10-step mean."""
    rows = read_metrics(metrics_path)
    panels = [(title, ylabel, [(k, lab) for k, lab in series if any(k in r for r in rows)])
              for title, ylabel, series in PANELS]
    panels = [p for p in panels if p[2]]
    steps, stages = stage_seconds(rows)
    if not rows or not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels) + bool(stages)
    cols = min(3, n)
    grid_rows = -(-n // cols)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(5 * cols, 3.6 * grid_rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (title, ylabel, series) in zip(flat, panels, strict=False):
        for i, (k, label) in enumerate(series):
            pts = [(r["step"], r[k]) for r in rows if k in r]
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            many = len(pts) > 20
            ax.plot(xs, ys, marker="." if len(pts) < 60 else None, lw=1, alpha=0.35 if many else 1.0,
                    color=f"C{i}", label=None if many else label)
            if many:  # a 10-step running mean makes the trend readable
                w = 10
                smooth = [sum(ys[max(0, j - w + 1):j + 1]) / len(ys[max(0, j - w + 1):j + 1]) for j in range(len(ys))]
                ax.plot(xs, smooth, lw=2, color=f"C{i}", label=f"{label} (10-step mean)")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1 or len(rows) > 20:
            ax.legend(fontsize=7)
    if stages:
        ax = flat[len(panels)]
        ax.stackplot(steps, *stages.values(), labels=[s.replace("_", " ") for s in stages], alpha=0.8)
        ax.set_title("Where each step's time went", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("seconds")
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    for ax in flat[n:]:
        ax.axis("off")
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)  # rewritten at every eval: a viewer never sees a half-written file
    return out_png


def step_summary(step: int, total: int, m: dict[str, float]) -> str:
    """The one-line console summary of a step: reward, accuracy, response length, clip fractions, entropy,
    seconds per stage and in all (and validation accuracy on eval steps)."""
    def g(k: str, fmt: str = ".3f") -> str:
        return format(m[k], fmt) if k in m else "-"

    parts = [f"step {step}/{total}", f"reward {g('reward/mean')}", f"acc {g('reward/accuracy')}",
             f"len {g('rollout/response_len_mean', '.0f')}",
             (f"gate {g('ratio/gate_weight_mean')}" if "ratio/gate_weight_mean" in m  # SAPO: no clip
              else f"clip {g('ratio/clip_frac_lower')}/{g('ratio/clip_frac_upper')}"), f"entropy {g('actor/entropy')}"]
    if "eval/accuracy" in m:
        parts.append(f"eval {g('eval/accuracy')}")
    stage = " ".join(f"{s.replace('old_logprob', 'logp').replace('weight_sync', 'sync')} {m[f'timing/{s}_s']:.1f}"
                     for s in STAGES if f"timing/{s}_s" in m)
    parts.append(f"s: {stage} | {g('timing/step_s', '.1f')} s")
    return " | ".join(parts)


def steady_medians(rows: list[dict]) -> tuple[list[dict], list[dict], Callable[[str], float | None]]:
    """(the step rows, the steady-state ones, median of a key over the steady ones or None where absent): each
    process's first step (flagged ``timing/warmup_step``) pays one-off costs and is left out while there are
    others."""
    import statistics

    steps = [r for r in rows if "timing/step_s" in r]
    steady = [r for r in steps if not r.get("timing/warmup_step")] or steps

    def med(key: str) -> float | None:
        vals = [float(r[key]) for r in steady if key in r]
        return statistics.median(vals) if vals else None

    return steps, steady, med


def run_summary(rows: list[dict]) -> str:
    """The end-of-run table (markdown): median seconds per stage and per step, update tokens/s and MFU, over the
    steady-state steps (each process's first step, flagged ``timing/warmup_step``, pays one-off costs and is left
    out while there are others); empty when no step was logged."""
    steps, steady, med = steady_medians(rows)
    if not steady:
        return ""
    step_s = med("timing/step_s") or 0.0
    lines = [f"## Run summary: medians over {len(steady)} steady-state step(s) of {len(steps)}", "",
             "| stage | seconds | share of the step |", "|---|---|---|"]
    for stage in STAGES:
        v = med(f"timing/{stage}_s")
        if v is None:
            continue
        ran = sum(f"timing/{stage}_s" in r for r in steady)
        name = stage.replace("_", " ") + (f" (in {ran} of {len(steady)} steps)" if ran < len(steady) else "")
        lines.append(f"| {name} | {v:.3f} | {100 * v / step_s if step_s else 0:.0f}% |")
    lines.append(f"| whole step | {step_s:.3f} | 100% |")
    lines.append("")
    for key, label, fmt in (("perf/update_tokens_per_s", "update tokens/s", ".0f"), ("perf/mfu", "MFU", ".1%")):
        v = med(key)
        if v is not None:
            lines.append(f"{label}: {v:{fmt}}  ")
    warm = [r for r in steps if r.get("timing/warmup_step")]
    if warm and steady is not steps:
        lines.append(f"first step of the run (one-off costs, left out above): {warm[0]['timing/step_s']:.3f} s  ")
    return "\n".join(lines) + "\n"
