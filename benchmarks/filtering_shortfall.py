"""How often online filtering trains fewer in-band groups than rollout_batch_size although the rounds found enough:
the rule before issue 31 (each rank trains at most its own share of what it found) against ``share_groups``.

    .venv/bin/python benchmarks/filtering_shortfall.py [--ranks 8] [--batch 64] [--rounds 4] [--steps 20000]

Each step, every rank rolls out its share of prompts per round; each group is in the band with probability p
(independently); rounds stop when the ranks hold ``batch`` in-band groups in all or ``rounds`` ran. Prints, per p,
the fraction of steps that found enough but trained fewer, and the mean in-band groups trained, for both rules.
No model runs: this is the rule alone, the counts the trainer's BatchFiller uses.
"""

from __future__ import annotations

import argparse

import torch

from mm_gmpo.rollout.batch import share_groups


def step(ranks: int, per_rank: int, rounds: int, p: float, g: torch.Generator) -> tuple[int, int, int]:
    """(in-band groups found, trained by the old rule, trained by share_groups) for one step."""
    counts = [0] * ranks
    for _ in range(rounds):
        found = (torch.rand(ranks, per_rank, generator=g) < p).sum(-1).tolist()
        counts = [c + f for c, f in zip(counts, found, strict=True)]
        if sum(counts) >= ranks * per_rank:
            break
    old = sum(min(c, per_rank) for c in counts)
    share, _ = share_groups(counts, per_rank)
    return sum(counts), old, sum(len(part) for part in share)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64, help="rollout_batch_size (prompt groups per step)")
    ap.add_argument("--rounds", type=int, default=4, help="max_filter_rounds")
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    per_rank = args.batch // args.ranks
    print(f"{args.ranks} ranks, rollout_batch_size {args.batch}, max_filter_rounds {args.rounds}, "
          f"{args.steps} steps per rate\n")
    print("| in-band rate p | steps that found enough | old rule: of those, trained fewer | old rule: in-band groups "
          "trained (mean) | share_groups: trained fewer | share_groups: in-band groups trained (mean) |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(args.seed)
    for p in (0.1, 0.2, 0.3, 0.5, 0.7, 0.9):
        enough = short_old = short_new = 0
        sum_old = sum_new = 0
        for _ in range(args.steps):
            found, old, new = step(args.ranks, per_rank, args.rounds, p, g)
            sum_old, sum_new = sum_old + old, sum_new + new
            if found >= args.batch:
                enough += 1
                short_old += old < args.batch
                short_new += new < args.batch
        print(f"| {p} | {enough / args.steps:.3f} | {short_old / max(enough, 1):.3f} | {sum_old / args.steps:.2f} | "
              f"{short_new / max(enough, 1):.3f} | {sum_new / args.steps:.2f} |")


if __name__ == "__main__":
    main()
