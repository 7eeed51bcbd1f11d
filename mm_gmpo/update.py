"""The update: one optimizer step over a mini-batch of rollouts, and a step's metrics over its optimizer steps.

Loss normalisation is global: the loss of every micro-batch on every rank is divided by the *global* count
(sequences for GMPO and ``seq_mean_token_mean``, valid tokens for GRPO ``token_mean``) and multiplied by the
world size to undo FSDP's gradient averaging, so the accumulated gradient equals the gradient of the loss of the
whole global batch, whatever the micro-batch split and the number of ranks.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mm_gmpo import distributed
from mm_gmpo.logprobs import micro_batches, packed
from mm_gmpo.loss import PolicyLossFn
from mm_gmpo.policy import PolicyBatch


@dataclass
class UpdateBatch:
    """Everything the update needs for B sampled responses (this rank's share)."""

    batch: PolicyBatch
    old_logprobs: torch.Tensor  # (B, R)
    advantages: torch.Tensor  # (B,)
    ref_logprobs: torch.Tensor | None = None  # (B, R)
    is_weights: torch.Tensor | None = None  # (B, R) truncated importance weights (train/inference mismatch)

    def select(self, idx: list[int]) -> UpdateBatch:
        sub = self.batch.select(idx)
        R = sub.response_width

        def cut(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[idx, :R]

        return UpdateBatch(sub, self.old_logprobs[idx, :R], self.advantages[idx], cut(self.ref_logprobs),
                           cut(self.is_weights))

    def to(self, device: torch.device) -> UpdateBatch:
        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device)

        return UpdateBatch(self.batch.to(device), self.old_logprobs.to(device), self.advantages.to(device),
                           move(self.ref_logprobs), move(self.is_weights))


class _MicroMetrics:
    """One optimizer step's loss metrics over its micro-batches: loss/* are already globally normalised, so they
    add up; ``*_min`` / ``*_max`` keep their extremes; everything else is a token-weighted mean."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.extremes: dict[str, float] = {}
        self.weighted: dict[str, float] = defaultdict(float)
        self.weight = 0.0

    def add(self, loss: float, metrics: dict[str, float], tokens: float) -> None:
        self.sums["loss/total"] += loss
        self.weight += tokens
        for k, v in metrics.items():
            if k.startswith("loss/"):
                self.sums[k] += v
            elif k.endswith("_min"):
                self.extremes[k] = min(self.extremes.get(k, v), v)
            elif k.endswith("_max"):
                self.extremes[k] = max(self.extremes.get(k, v), v)
            else:
                self.weighted[k] += v * tokens

    def local(self) -> dict[str, float]:
        return {k: v / max(self.weight, 1.0) for k, v in self.weighted.items()} | self.extremes


def policy_update(
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: UpdateBatch,
    loss_fn: PolicyLossFn,
    *,
    loss_kwargs: dict | None = None,
    normalize_by: str = "sequences",
    max_tokens_per_micro_batch: int = 8192,
    max_grad_norm: float = 1.0,
    with_entropy: bool = False,
    temperature: float = 1.0,
    allowed_token_ids: Sequence[int] | None = None,
    device: torch.device | None = None,
    keep_grads: bool = False,
    group_size: int = 1,
) -> dict[str, float]:
    """One optimizer step over ``data`` (split into micro-batches by token budget); returns averaged metrics.

    ``normalize_by``: 'sequences' (GMPO, GRPO seq_mean_token_mean) or 'tokens' (GRPO token_mean).
    ``keep_grads``: leave the step's gradients in ``.grad`` (tests); by default they are freed after the step.
    ``group_size``: the samples of a prompt are that many adjacent rows (kept in one micro-batch if they fit).
    """
    t0 = time.perf_counter()
    loss_kwargs = dict(loss_kwargs or {})
    B = data.batch.batch_size
    local_tokens = float(data.batch.response_mask.sum())
    global_seqs, global_tokens = distributed.all_reduce_sum([float(B), local_tokens], device)
    normalizer = global_seqs if normalize_by == "sequences" else global_tokens
    scale = float(distributed.world_size())  # undo FSDP's mean over ranks: we normalise globally ourselves

    groups = micro_batches(data.batch, max_tokens_per_micro_batch, device, packed(policy), group_size)
    n_micro = len(groups)

    policy.train()
    patches_before = getattr(policy, "vision_patches", 0)
    optimizer.zero_grad(set_to_none=True)
    acc = _MicroMetrics()
    for idx in groups:
        empty = not idx
        mb = data.select(idx if idx else [0])
        if device is not None:
            mb = mb.to(device)
        logprobs, entropy = policy(mb.batch, with_entropy=with_entropy, temperature=temperature,
                                   allowed_token_ids=allowed_token_ids)
        loss, m = loss_fn(logprobs, mb.old_logprobs, mb.advantages, mb.batch.response_mask, normalizer=normalizer,
                          ref_logprobs=mb.ref_logprobs, entropy=entropy, is_weights=mb.is_weights, **loss_kwargs)
        if empty:  # a padding pass that keeps ranks in step: contributes no gradient
            loss = loss * 0.0
        (loss * scale).backward()
        if empty:
            continue
        acc.add(loss.item(), m, float(mb.batch.response_mask.sum()))

    grad_norm = distributed.clip_grad_norm(policy.parameters(), max_grad_norm)
    if math.isfinite(grad_norm):
        optimizer.step()
        skipped = 0.0
    else:  # never apply a NaN/inf update; the step is reported and skipped
        skipped = 1.0
    if not keep_grads or skipped:
        # free the gradients now, not at the next update: held through the rollout they cost an fp32 copy of the
        # (sharded) model, memory vLLM needs to wake up
        optimizer.zero_grad(set_to_none=True)
    acc.sums["perf/update_vision_patches"] = float(getattr(policy, "vision_patches", 0) - patches_before)
    metrics = distributed.all_reduce_sum_metrics(dict(acc.sums), device)  # over every rank's keys (see there)
    metrics |= distributed.all_reduce_mean_metrics(acc.local(), device)
    metrics.update({
        "actor/grad_norm": grad_norm,
        "actor/skipped_step": skipped,
        "actor/lr": optimizer.param_groups[0]["lr"],
        "actor/micro_batches": float(n_micro),
        "timing/update_s": time.perf_counter() - t0,
    })
    return metrics


LAST = ("actor/lr",)  # the rate the step ended on
SUMMED = ("actor/skipped_step", "perf/update_vision_patches", "timing/update_s")


def step_update_metrics(updates: list[dict[str, float]]) -> dict[str, float]:
    """A step's update metrics over its optimizer steps (``policy_update`` results, in order): the mean of each
    (loss, grad norm, ratios, ...), the extremes of ``*_min`` / ``*_max``, the sums of counts, the last learning
    rate; ``actor/grad_norm_last`` is the grad norm of the last optimizer step."""
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for m in updates for k in m):
        values = [m[key] for m in updates if key in m]
        if key in LAST:
            out[key] = values[-1]
        elif key in SUMMED:
            out[key] = sum(values)
        elif key.endswith("_min"):
            out[key] = min(values)
        elif key.endswith("_max"):
            out[key] = max(values)
        else:
            out[key] = sum(values) / len(values)
    if updates:
        out["actor/grad_norm_last"] = updates[-1]["actor/grad_norm"]
    return out
