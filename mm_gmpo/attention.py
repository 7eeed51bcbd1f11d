"""Attention without flash-attn for the two places transformers' SDPA path is slow: segments of one packed row.

**Vision tower.** transformers runs Qwen2.5-VL's windowed vision attention as one SDPA call per window: a 448x448
image has 16 windows of 64 patches, so 8 images cost 128 tiny calls in each of the 28 windowed blocks, in
forward, recompute and backward. On an H100 that tower took ~4x the language model's time for a third of its
FLOPs (``shared/gpu/README.md``). :func:`grouped_varlen_sdpa` stacks windows of equal length into a batch and
attends them in one call; the result is the same attention, exactly (float64 test against transformers' loop).
It is used through transformers' ``AttentionInterface``: the vision config's attention implementation is set to
:data:`NAME`, whose ``flash`` substring makes the vision blocks pass ``cu_seqlens`` (the flash-attn varlen calling
convention); the text model keeps its own implementation. The default on a GPU (``model.vision_attention=auto``):
on an H100 it cut the Qwen2.5-VL-3B update step (8 x 1024 tokens, 448x448 images) from 2.45 s to 1.00 s
(``benchmarks/RESULTS.md``); on a CPU, where the per-window calls are compute- rather than launch-bound, it was
not faster, so auto keeps transformers' loop there.

**Language model, packed micro-batches.** Packing the sequences of a micro-batch into one padding-free row saves
the padding's compute, but under transformers' SDPA it costs a (T x T) block-diagonal mask, which also keeps
SDPA off its flash kernel. :func:`packed_causal_sdpa` (:data:`TEXT_NAME`) attends each sequence of the row with
its own causal SDPA call instead (no mask: the flash kernel on a GPU); sequences are where the position ids
restart. Every other call (padded batches, generation with a KV cache) goes to transformers' own SDPA function
with transformers' own mask, so the model stays usable for ``generate``. Installed by ``Policy(packed=True)``.

Both read segment bounds to the host once per forward, not once per layer: transformers hands the same
``cu_seqlens`` / position-id tensor to every layer (and to activation checkpointing's recompute), and the bounds
are cached on that tensor object.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

NAME = "sdpa_grouped_flashapi"  # must contain "flash": transformers passes cu_seqlens only to flash-style kernels
TEXT_NAME = "sdpa_packed"  # its mask function: _packed_text_mask
_BOUNDS = "_mm_gmpo_segment_bounds"


def _cached_bounds(t: torch.Tensor, compute) -> list[int]:
    """``compute(t)`` (segment bounds as host ints), computed once per tensor object: one device sync per forward."""
    bounds = getattr(t, _BOUNDS, None)
    if bounds is None:
        bounds = compute(t)
        setattr(t, _BOUNDS, bounds)
    return bounds


def sequence_bounds(position_ids: torch.Tensor) -> list[int]:
    """Bounds [0, ..., T] of the sequences in one packed row: a sequence starts where positions do not go up by 1."""
    pos = position_ids.reshape(-1)
    starts = ((pos[1:] - pos[:-1]) != 1).nonzero().flatten() + 1
    return [0, *starts.tolist(), pos.numel()]


def attend_segments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int], *,
                    causal: bool, scale: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Block-diagonal attention of one row: (1, Hq, N, D) queries, (1, Hkv, N, D) keys/values, segments
    ``bounds[i]:bounds[i+1]``, each attended only to itself (causally if ``causal``). Returns (1, N, Hq, D).

    Segments of equal length go through one batched SDPA call (when all are equal, as a view without a copy);
    when all lengths differ, one call per segment on slices. Grouped-query attention (Hkv < Hq) by SDPA's
    ``enable_gqa``.
    """
    heads, n, dim = query.shape[1:]
    gqa = key.shape[1] != heads

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal, scale=scale,
                                              enable_gqa=gqa)

    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    if len(set(lengths)) == 1:  # every segment the same length: a view, no copy
        seg, count = lengths[0], len(lengths)

        def stack(x: torch.Tensor) -> torch.Tensor:
            return x[0].reshape(x.shape[1], count, seg, dim).transpose(0, 1)

        out = sdpa(stack(query), stack(key), stack(value))
        return out.permute(0, 2, 1, 3).reshape(1, n, heads, dim)
    if len(set(lengths)) == len(lengths):  # all different (packed text): one call per slice, outputs in order
        outs = [sdpa(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b]) for a, b in itertools.pairwise(bounds)]
        return torch.cat(outs, 2).transpose(1, 2)
    starts_by_len: dict[int, list[int]] = {}
    for start, seg in zip(bounds[:-1], lengths, strict=True):
        starts_by_len.setdefault(seg, []).append(start)
    outs, order = [], []
    for seg, starts in starts_by_len.items():
        idx = (torch.tensor(starts, device=query.device)[:, None]
               + torch.arange(seg, device=query.device)).reshape(-1)
        count = len(starts)

        def gather(x: torch.Tensor, idx=idx, seg=seg, count=count) -> torch.Tensor:
            return x[0].index_select(1, idx).reshape(x.shape[1], count, seg, dim).transpose(0, 1)

        out = sdpa(gather(query), gather(key), gather(value))
        outs.append(out.transpose(0, 1).reshape(heads, -1, dim))
        order.append(idx)
    perm = torch.cat(order)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n, device=perm.device)
    return torch.cat(outs, 1).index_select(1, inverse).transpose(0, 1).unsqueeze(0)


def grouped_varlen_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None = None, scaling: float | None = None,
                        dropout: float = 0.0, cu_seq_lens_q: torch.Tensor | None = None, is_causal: bool = False,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """The vision tower's attention (:data:`NAME`): block-diagonal attention of (1, H, N, D) tensors, segments
    given by ``cu_seq_lens_q``. Returns (1, N, H, D) like transformers' attention functions."""
    if query.shape[0] != 1:
        raise ValueError(f"{NAME} handles one packed row, got batch {query.shape[0]}")
    if cu_seq_lens_q is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                             is_causal=bool(is_causal), scale=scaling)
        return out.transpose(1, 2), None
    bounds = _cached_bounds(cu_seq_lens_q, lambda t: [int(b) for b in t.tolist()])
    return attend_segments(query, key, value, bounds, causal=bool(is_causal), scale=scaling, dropout=dropout), None


def packed_causal_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The language model's attention (:data:`TEXT_NAME`): per-sequence causal SDPA for one unmasked row (a
    packed micro-batch, or a single unpadded sequence), transformers' SDPA attention for everything else."""
    if attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2]:
        n = query.shape[2]
        if position_ids is None:
            bounds = [0, n]
        elif position_ids.numel() == n:
            bounds = _cached_bounds(position_ids, sequence_bounds)
        else:
            raise ValueError(f"{TEXT_NAME}: {position_ids.numel()} position ids for a row of {n} tokens")
        return attend_segments(query, key, value, bounds, causal=True, scale=scaling, dropout=dropout), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  position_ids=position_ids, **kwargs)


def _packed_text_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                      attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers' SDPA mask, except none at all for one unmasked row without a cache: the case
    :func:`packed_causal_sdpa` attends per sequence, where the SDPA mask would be a (T x T) block-diagonal one."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and batch_size == 1 and q_length == kv_length and not q_offset and not kv_offset:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask, **kwargs)


def use_packed_text_attention(model: nn.Module) -> bool:
    """Route the language model's attention through :func:`packed_causal_sdpa` (for packed micro-batches).

    Only a model whose language model uses transformers' SDPA and no sliding window is changed (returns True);
    flash_attention_2 already attends packed rows without a mask, and eager is left as it is. Not saved with
    the model: an exported config.json keeps transformers' own setting.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    text_cfg = getattr(model.config, "text_config", model.config)
    if text_cfg._attn_implementation == TEXT_NAME:
        return True
    if text_cfg._attn_implementation != "sdpa" or getattr(text_cfg, "use_sliding_window", False):
        return False
    AttentionInterface.register(TEXT_NAME, packed_causal_sdpa)
    AttentionMaskInterface.register(TEXT_NAME, _packed_text_mask)
    text_cfg._attn_implementation_internal = TEXT_NAME
    return True


def use_grouped_vision_attention(model: nn.Module) -> bool:
    """Route a vision tower's attention through :func:`grouped_varlen_sdpa` (Qwen2.5-VL's windows; Qwen2-VL's and
    Qwen3-VL's whole images, where images of equal patch counts share a call).

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
