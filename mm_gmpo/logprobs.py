"""Micro-batch planning and the forward-only log-prob pass (old log-probs, reference log-probs).

Every pass over a rank's samples runs as many micro-batches on every rank, so that FSDP2's collectives pair up.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mm_gmpo import distributed
from mm_gmpo.balance import balanced_micro_batches, micro_batches_needed
from mm_gmpo.policy import PolicyBatch, split_by_token_budget


def packed(policy: nn.Module) -> bool:
    """Whether the policy packs micro-batches (then the token budget counts real tokens, not padded rows)."""
    return bool(getattr(policy, "packed", False))


def micro_batches(batch: PolicyBatch, max_tokens: int, device, packed: bool, group_size: int = 1) -> list[list[int]]:
    """The micro-batches of this rank's samples, as many on every rank (the collectives of each pass pair up).

    Packed: every rank makes as many micro-batches as the rank that needs the most (within ``max_tokens``) and
    splits its tokens evenly among them, whole prompt groups of ``group_size`` where possible (balanced_micro_batches):
    no rank runs a pass with nothing to do unless it has fewer samples than passes. Padded (eager attention, a
    pass costs count x longest): token-budget micro-batches of similar lengths, padded with empty passes."""
    lengths = [int(n) for n in batch.attention_mask.sum(-1).tolist()]
    if packed:
        need = micro_batches_needed(lengths, max_tokens, group_size)
        return balanced_micro_batches(lengths, int(distributed.all_reduce_max(float(need), device)), max_tokens,
                                      group_size)
    groups = split_by_token_budget(lengths, max_tokens)
    n_micro = int(distributed.all_reduce_max(float(len(groups)), device))
    return groups + [[] for _ in range(n_micro - len(groups))]



@torch.no_grad()
def compute_logprobs(policy: nn.Module, batch: PolicyBatch, *, max_tokens_per_micro_batch: int = 8192,
                     temperature: float = 1.0, allowed_token_ids: Sequence[int] | None = None,
                     device: torch.device | None = None, group_size: int = 1) -> torch.Tensor:
    """(B, R) log-probs of the responses under the current policy, micro-batched (the 'old log-probs' stage);
    ``group_size``: the samples of a prompt are that many adjacent rows (kept in one micro-batch if they fit)."""
    policy.eval()
    out = torch.zeros(batch.response_mask.shape, dtype=torch.float32)
    for idx in micro_batches(batch, max_tokens_per_micro_batch, device, packed(policy), group_size):
        mb = batch.select(idx if idx else [0])
        lp, _ = policy(mb.to(device) if device is not None else mb, temperature=temperature,
                       allowed_token_ids=allowed_token_ids)
        if idx:
            out[idx, :lp.shape[1]] = lp.float().cpu()
    return out
