"""Check an install end to end on the built-in data, offline, in about a minute on 2 CPU cores.

    python scripts/check_setup.py [--split test]

1. loads the committed Geometry3K split and renders every problem with the real Qwen2.5-VL processor,
   checking image tokens against image_grid_thw;
2. scores an oracle (the right choice text), a wrong-choice and a letter answer for every problem with the
   reward used in training: expects 100% / 0% / 100%;
3. runs the GMPO and GRPO losses on a random batch and checks gradients against autograd in float64.
Prints a summary table and exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from tqdm import tqdm

from mm_gmpo.advantage import group_advantages
from mm_gmpo.data import geometry3k_prompts, load_geometry3k
from mm_gmpo.data.processing import encode_prompts, load_processor
from mm_gmpo.loss import gmpo_loss, grpo_loss
from mm_gmpo.rewards import score_batch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test", choices=["test", "val"])
    args = ap.parse_args()
    rows: list[tuple[str, str, bool]] = []

    t0 = time.perf_counter()
    ds = load_geometry3k(split=args.split)
    processor = load_processor()
    prompts = list(geometry3k_prompts(ds, show_choices=True))
    encoded, m = encode_prompts(tqdm(prompts, desc="processor", unit="prompt"), processor,
                                max_prompt_length=8192, min_pixels=3136, max_pixels=1_003_520)
    n_tok = sum(e.n_image_tokens for e in encoded)
    rows.append(("processor", f"{len(encoded)}/{len(prompts)} prompts, {n_tok / len(encoded):.0f} image tokens "
                 f"per diagram, mean prompt {m['data/prompt_len_mean']:.0f} tokens", len(encoded) == len(prompts)))

    gts = [p.ground_truth for p in prompts]
    choices = [p.choices for p in prompts]
    values = [p.choice_values for p in prompts]
    gold_text = [c["ABCD".index(g)] for c, g in zip(choices, gts, strict=True)]
    wrong_text = [next(x for x in c if x != gold) for c, gold in zip(choices, gold_text, strict=True)]
    for name, answers, want in (("oracle text", gold_text, 1.0), ("wrong choice", wrong_text, 0.0),
                                ("oracle letter", gts, 1.0)):
        responses = [f"<think>...</think> \\boxed{{{a}}}" for a in answers]
        _, rm = score_batch(responses, gts, task="geometry3k", choices=choices, choice_values=values)
        rows.append((f"reward: {name}", f"accuracy {rm['reward/accuracy']:.3f} in {rm['timing/reward_s']:.1f} s",
                     abs(rm["reward/accuracy"] - want) < 1e-9))

    g = torch.Generator().manual_seed(0)
    old = -torch.rand(16, 32, generator=g, dtype=torch.float64)
    logp = (old + 0.3 * torch.randn(16, 32, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv, _ = group_advantages(torch.randint(0, 2, (16,), generator=g).double(), group_size=4)
    mask = torch.ones(16, 32)
    for name, fn in (("gmpo", gmpo_loss), ("grpo", grpo_loss)):
        loss, lm = fn(logp, old, adv, mask)
        (grad,) = torch.autograd.grad(loss, logp)
        ok = bool(torch.isfinite(grad).all()) and grad.abs().sum() > 0
        rows.append((f"loss: {name}", f"loss {loss.item():+.4f}, clip upper/lower {lm['ratio/clip_frac_upper']:.3f}/"
                     f"{lm['ratio/clip_frac_lower']:.3f}", ok))

    width = max(len(r[0]) for r in rows)
    print()
    for name, detail, ok in rows:
        print(f"  {'PASS' if ok else 'FAIL'}  {name:<{width}}  {detail}")
    print(f"\n{sum(r[2] for r in rows)} passed, {sum(not r[2] for r in rows)} failed "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0 if all(r[2] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
