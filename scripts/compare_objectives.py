"""GMPO vs GRPO on the same seed and task, side by side: reward, token log-ratio range, clip fraction, entropy.

    python scripts/compare_objectives.py [--config configs/tiny.yaml] [--nproc 2] [key.sub=value ...]
    python scripts/compare_objectives.py --configs configs/geo3k_qwen2_5_vl_7b_gmpo.yaml \
        configs/geo3k_qwen2_5_vl_7b_grpo_easyr1.yaml --nproc 8

Runs `torchrun scripts/train_mm.py` twice (algorithm.objective=gmpo, then grpo with its usual 0.2 ratio clip),
into <output_dir>_gmpo and <output_dir>_grpo, then writes <output_dir>_compare.png. With ``--configs A B`` it runs
the two configs as they are (each into its own output_dir; the overrides apply to both), e.g. the paper's GMPO
run beside EasyR1's GRPO recipe, and writes <A's output_dir>_vs_<B's name>.png. The GMPO paper's claim is
that the geometric mean keeps token log-ratios in a narrower range (more stable updates) at equal or better reward.
On the built-in task (one-token answers) the geometric and arithmetic means coincide, so there the runs differ
only in their clip ranges; use a config with long responses (Geometry3K, MATH) to see the paper's effect.
A summary table (last-20-step reward, extreme token log-ratios, mean clip fraction and entropy) is printed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from mm_gmpo.config import load_config
from mm_gmpo.logger import read_metrics

ROOT = Path(__file__).resolve().parents[1]
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
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    print(f"wrote {out_png}")


def summary(runs: dict[str, Path], last: int = 20) -> str:
    """Markdown table: reward over the last steps, the widest token log-ratios, mean clip fraction and entropy."""
    lines = [f"| objective | reward (last {last}) | token log-ratio min / max | clip frac | entropy (last {last}) |",
             "|---|---|---|---|---|"]
    for name, folder in runs.items():
        rows = read_metrics(folder / "metrics.jsonl")
        if not rows:
            continue
        tail = rows[-last:]

        def mean(key, rs):
            vals = [r[key] for r in rs if key in r]
            return sum(vals) / max(len(vals), 1)

        lo = min(r.get("ratio/token_log_ratio_min", 0.0) for r in rows)
        hi = max(r.get("ratio/token_log_ratio_max", 0.0) for r in rows)
        clip = mean("ratio/clip_frac_upper", rows) + mean("ratio/clip_frac_lower", rows)
        lines.append(f"| {name} | {mean('reward/mean', tail):.3f} | {lo:.2f} / {hi:.2f} | {clip:.4f} | "
                     f"{mean('actor/entropy', tail):.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--configs", nargs=2, metavar=("A", "B"), default=None,
                    help="two configs to run as they are (instead of one config run with both objectives)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--plot-only", action="store_true", help="only redraw the plot from existing runs")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.configs:
        runs = {Path(c).stem: Path(load_config(c, args.overrides).trainer.output_dir) for c in args.configs}
        if len(set(runs.values())) < 2:
            raise SystemExit("--configs: both configs write to the same trainer.output_dir; give them different ones")
        if not args.plot_only:
            for config in args.configs:
                run(config, args.nproc, args.overrides)
        a, b = runs.values()
        plot(runs, Path(f"{a}_vs_{b.name}.png"))
        print(summary(runs))
        return
    base = Path(load_config(args.config, args.overrides).trainer.output_dir)
    runs = {"gmpo": Path(f"{base}_gmpo"), "grpo": Path(f"{base}_grpo")}
    if not args.plot_only:
        run(args.config, args.nproc, [*args.overrides, "algorithm.objective=gmpo", f"trainer.output_dir={runs['gmpo']}"])
        run(args.config, args.nproc, [*args.overrides, "algorithm.objective=grpo", "algorithm.clip_low=0.2",
                                      "algorithm.clip_high=0.2", f"trainer.output_dir={runs['grpo']}"])
    plot(runs, Path(f"{base}_compare.png"))
    print(summary(runs))


if __name__ == "__main__":
    main()
