"""Objectives side by side on the same task and seeds: reward, token log-ratio range, clip fraction, entropy.

    python scripts/compare_objectives.py [--config configs/tiny.yaml] [--objectives gmpo grpo gspo ...]
                                         [--seeds 1 2] [--nproc 2] [key.sub=value ...]
    python scripts/compare_objectives.py --configs configs/geo3k_qwen2_5_vl_7b_gmpo.yaml \\
        configs/geo3k_qwen2_5_vl_7b_gspo.yaml configs/geo3k_qwen2_5_vl_7b_grpo_easyr1.yaml --nproc 8

Runs `torchrun scripts/train_mm.py` once per objective and seed (``algorithm.objective=<name>``, each with its
paper's clips and aggregation unless the config or the overrides set them), into <output_dir>_<objective> (and
_seed<k> with several seeds), then writes <output_dir>_compare.png and prints a table. With ``--configs`` it runs
each config as it is (each into its own output_dir; the overrides apply to all), e.g. the paper's GMPO run beside
EasyR1's GRPO recipe, and writes <first output_dir>_vs.png.

The table has what the GMPO paper plots for stability: the widest token log-ratios over the run (how far the
policy moved from the one that sampled, per token), the mean clip fraction (for SAPO, which has no clip, the mean
gate weight instead), the entropy, and the reward over the last steps. On the built-in task (one-token answers)
a sequence is one token, so the geometric and arithmetic means coincide there and the objectives differ in their
clips, gates and weights only; use a config with long responses (Geometry3K, MATH) to see GMPO's effect.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from mm_gmpo.config import CHOICES, load_config
from mm_gmpo.logger import read_metrics

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = CHOICES["algorithm.objective"]
PANELS = (("reward/mean", "mean reward"), ("ratio/token_log_ratio_max", "max token log-ratio"),
          ("ratio/token_log_ratio_min", "min token log-ratio"), ("ratio/clip_frac_upper", "clip fraction (upper)"),
          ("actor/entropy", "entropy"))


def run(config: str, nproc: int, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "scripts" / "train_mm.py"), "--config", config, *overrides]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def plot(runs: dict[str, Path], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for name, folder in runs.items():
        rows = read_metrics(folder / "metrics.jsonl")
        for ax, (key, title) in zip(axes, PANELS, strict=True):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, lw=1)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    print(f"wrote {out_png}")


def _mean(key: str, rows: list[dict]) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else None


def summary(runs: dict[str, Path], last: int = 20) -> str:
    """Markdown table, a row per run: reward over the last steps and >= 0.9 first, the widest token and sequence
    log-ratios, mean clip fraction (SAPO: gate weight), entropy over the last steps, the last greedy eval."""
    lines = [f"| run | reward (last {last}) | reward >= 0.9 first | token log-ratio min / max | "
             f"seq log-ratio min / max | clip frac (SAPO: gate weight) | entropy (last {last}) | last eval |",
             "|---|---|---|---|---|---|---|---|"]
    for name, folder in runs.items():
        rows = [r for r in read_metrics(folder / "metrics.jsonl") if "reward/mean" in r]
        if not rows:
            continue
        tail = rows[-last:]
        first = next((r["step"] for r in rows if r["reward/mean"] >= 0.9), None)
        lo = min(r.get("ratio/token_log_ratio_min", 0.0) for r in rows)
        hi = max(r.get("ratio/token_log_ratio_max", 0.0) for r in rows)
        s_lo = min(r.get("ratio/seq_log_ratio_min", 0.0) for r in rows)
        s_hi = max(r.get("ratio/seq_log_ratio_max", 0.0) for r in rows)
        gate = _mean("ratio/gate_weight_mean", rows)
        clipped = (_mean("ratio/clip_frac_upper", rows) or 0.0) + (_mean("ratio/clip_frac_lower", rows) or 0.0)
        clip = f"gate {gate:.4f}" if gate is not None else f"{clipped:.4f}"
        evals = [r["eval/accuracy"] for r in read_metrics(folder / "metrics.jsonl") if "eval/accuracy" in r]
        entropy = _mean("actor/entropy", tail)
        lines.append(f"| {name} | {_mean('reward/mean', tail):.3f} | {first if first is not None else '-'} | "
                     f"{lo:.3f} / {hi:.3f} | {s_lo:.3f} / {s_hi:.3f} | {clip} | "
                     f"{'-' if entropy is None else f'{entropy:.3f}'} | {f'{evals[-1]:.3f}' if evals else '-'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES),
                    help="objectives to run on --config (default: all six)")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="trainer.seed values (default: the config's)")
    ap.add_argument("--configs", nargs="+", metavar="CONFIG", default=None,
                    help="configs to run as they are (instead of one config run with each objective)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--last", type=int, default=20, help="steps the reward and entropy columns average over")
    ap.add_argument("--plot-only", action="store_true", help="only redraw the plot and table from existing runs")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    seeds = args.seeds or [None]
    plan: dict[str, tuple[str, list[str]]] = {}  # run name -> (config, overrides)
    if args.configs:
        for config in args.configs:
            for seed in seeds:
                extra = [] if seed is None else [f"trainer.seed={seed}"]
                out = Path(load_config(config, [*args.overrides, *extra]).trainer.output_dir)
                if seed is not None:
                    out = Path(f"{out}_seed{seed}")
                    extra.append(f"trainer.output_dir={out}")
                name = Path(config).stem + ("" if seed is None else f" seed {seed}")
                plan[name] = (config, [*args.overrides, *extra])
        out_png = Path(f"{load_config(args.configs[0], args.overrides).trainer.output_dir}_vs.png")
    else:
        base = Path(load_config(args.config, args.overrides).trainer.output_dir)
        for objective in args.objectives:
            for seed in seeds:
                suffix = "" if seed is None else f"_seed{seed}"
                extra = [f"algorithm.objective={objective}", f"trainer.output_dir={base}_{objective}{suffix}"]
                extra += [] if seed is None else [f"trainer.seed={seed}"]
                plan[objective + ("" if seed is None else f" seed {seed}")] = (args.config, [*args.overrides, *extra])
        out_png = Path(f"{base}_compare.png")
    runs = {name: Path(load_config(config, overrides).trainer.output_dir) for name, (config, overrides) in plan.items()}
    if len(set(runs.values())) < len(runs):
        raise SystemExit("compare_objectives: two runs would write to the same trainer.output_dir; give each config "
                         "its own")
    if not args.plot_only:
        for config, overrides in plan.values():
            run(config, args.nproc, overrides)
    plot(runs, out_png)
    print(summary(runs, args.last))


if __name__ == "__main__":
    main()
