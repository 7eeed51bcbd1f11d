"""Qwen2.5-VL vision-tower attention without flash-attn: one batched SDPA call per window length.

Without flash-attn, transformers runs the vision tower's windowed attention as one SDPA call per window: a
448x448 image has 16 windows of 64 patches, so 8 images cost 128 tiny calls in each of the 28 windowed blocks, in
forward, recompute and backward. On an H100 that tower took ~4x the language model's time for a third of its
FLOPs (``shared/gpu/README.md``). Here the windows of equal length are stacked into a batch and attended in one
call; the result is the same attention, exactly (float64 test against transformers' per-window loop).

Used through transformers' ``AttentionInterface``: the vision config's attention implementation is set to
:data:`NAME`, whose ``flash`` substring makes the vision blocks pass ``cu_seqlens`` (the flash-attn varlen calling
convention); the text model keeps its own implementation. The default on a GPU (``model.vision_attention=auto``):
on an H100 it cut the Qwen2.5-VL-3B update step (8 x 1024 tokens, 448x448 images) from 2.45 s to 1.00 s
(``benchmarks/RESULTS.md``); on a CPU, where the per-window calls are compute- rather than launch-bound, it was
not faster, so auto keeps transformers' loop there.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

NAME = "sdpa_grouped_flashapi"  # must contain "flash": transformers passes cu_seqlens only to flash-style kernels


def grouped_varlen_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None = None, scaling: float | None = None,
                        dropout: float = 0.0, cu_seq_lens_q: torch.Tensor | None = None, is_causal: bool = False,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """Block-diagonal (per-segment) attention of (1, H, N, D) tensors, segments given by ``cu_seq_lens_q``.

    Returns (1, N, H, D) like transformers' attention functions. Segments of equal length go through one SDPA
    call; when all are equal (the usual case for windows) no gather is needed.
    """
    if query.shape[0] != 1:
        raise ValueError(f"{NAME} handles one packed row, got batch {query.shape[0]}")
    heads, n, dim = query.shape[1:]
    causal = bool(is_causal)
    if cu_seq_lens_q is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                             is_causal=causal, scale=scaling)
        return out.transpose(1, 2), None
    bounds = cu_seq_lens_q.tolist()
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    if len(set(lengths)) == 1:  # every segment the same length: a view, no copy
        seg, count = lengths[0], len(lengths)

        def stack(x: torch.Tensor) -> torch.Tensor:
            return x[0].reshape(heads, count, seg, dim).transpose(0, 1)

        out = F.scaled_dot_product_attention(stack(query), stack(key), stack(value), dropout_p=dropout,
                                             is_causal=causal, scale=scaling)
        return out.permute(0, 2, 1, 3).reshape(1, n, heads, dim), None
    starts_by_len: dict[int, list[int]] = {}
    for start, seg in zip(bounds[:-1], lengths, strict=True):
        starts_by_len.setdefault(seg, []).append(start)
    outs, order = [], []
    for seg, starts in starts_by_len.items():
        idx = (torch.tensor(starts, device=query.device)[:, None]
               + torch.arange(seg, device=query.device)).reshape(-1)

        count = len(starts)

        def gather(x: torch.Tensor, idx=idx, seg=seg, count=count) -> torch.Tensor:
            return x[0].index_select(1, idx).reshape(heads, count, seg, dim).transpose(0, 1)

        out = F.scaled_dot_product_attention(gather(query), gather(key), gather(value), dropout_p=dropout,
                                             is_causal=causal, scale=scaling)
        outs.append(out.transpose(0, 1).reshape(heads, -1, dim))
        order.append(idx)
    perm = torch.cat(order)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n, device=perm.device)
    return torch.cat(outs, 1).index_select(1, inverse).transpose(0, 1).unsqueeze(0), None


def use_grouped_vision_attention(model: nn.Module) -> bool:
    """Route a Qwen2.5-VL vision tower's attention through :func:`grouped_varlen_sdpa`.

    Leaves a model alone (returns False) when it has no vision tower or its vision tower already uses a flash
    kernel. Not saved with the model: an exported config.json keeps transformers' own setting.
    """
    from transformers import AttentionInterface

    vision_cfg = getattr(model.config, "vision_config", None)
    if vision_cfg is None:
        return False
    if vision_cfg._attn_implementation == NAME:
        return True
    if "flash" in str(vision_cfg._attn_implementation or ""):
        return False
    AttentionInterface.register(NAME, grouped_varlen_sdpa)
    vision_cfg._attn_implementation_internal = NAME
    return True
