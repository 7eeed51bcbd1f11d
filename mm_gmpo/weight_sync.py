"""Weight sync from the trained policy (FSDP2-sharded or not) into a rollout engine. One public function.

Parameters are gathered one at a time (``DTensor.full_tensor``) and streamed to ``engine.update_weights`` as
they arrive, so no rank ever holds a second full copy of the model: peak extra memory is the largest single
tensor (the 152k x hidden embedding). Each shard is cast to the engine's dtype before it is gathered, not after:
a bf16 gather moves half the bytes of an fp32 one (15 GB instead of 30 GB per rank per step for the 7B) and
gives the same tensor, since casting is elementwise. LoRA layers' base weights and adapters are gathered in
their own dtype: their merge is computed in float32 first. Names are the transformers names
(``model.language_model.*``, ``model.visual.*``, ``lm_head.*``), which vLLM's Qwen-VL ``load_weights``
accepts as they are. Every engine's ``update_weights`` must leave no state computed with the old weights behind
(vLLM: prefix cache and the multimodal encoder/processor caches), which is why sync goes through this one
function.

With LoRA the engine gets merged weights under the plain names (``mm_gmpo.lora.merge_lora``: one layer's base
weight and adapters at a time, ``W + scaling * B @ A`` in float32, then cast).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from torch import nn

from mm_gmpo.distributed import full_tensor
from mm_gmpo.lora import is_lora_part, lora_scalings, merge_lora
from mm_gmpo.rollout.base import RolloutEngine


def _gathered(model: nn.Module, dtype: torch.dtype | None, scalings: dict[str, float],
              stats: dict) -> Iterator[tuple[str, torch.Tensor]]:
    for name, param in model.named_parameters():  # tied weights appear once (lm_head <- embed_tokens)
        shard = param.data
        if dtype is not None and shard.dtype != dtype and not is_lora_part(name, scalings):
            shard = shard.to(dtype)  # a DTensor stays a DTensor: only this rank's shard is cast
        stats["gathered_bytes"] += shard.numel() * shard.element_size()
        yield name, full_tensor(shard)  # FSDP2 shards: all ranks gather together, wherever the shards are


def _full_named_tensors(policy: nn.Module, dtype: torch.dtype | None, stats: dict) -> Iterator[tuple[str, torch.Tensor]]:
    model = getattr(policy, "model", policy)
    scalings = lora_scalings(model)
    for name, t in merge_lora(_gathered(model, dtype, scalings, stats), scalings):
        if dtype is not None:
            t = t.to(dtype)
        stats["tensors"] += 1
        stats["bytes"] += t.numel() * t.element_size()
        stats["max_tensor_bytes"] = max(stats["max_tensor_bytes"], t.numel() * t.element_size())
        yield name, t


@torch.no_grad()
def sync_weights(policy: nn.Module, engine: RolloutEngine, *, dtype: torch.dtype | None = None) -> dict[str, float]:
    """Copy the policy's current weights into ``engine`` (call on every rank); returns timing/size metrics.

    dtype: cast before sending (e.g. bf16 for a bf16 vLLM engine); default: the policy's parameter dtype.
    """
    t0 = time.perf_counter()
    stats = {"tensors": 0, "bytes": 0, "max_tensor_bytes": 0, "gathered_bytes": 0}
    engine.update_weights(_full_named_tensors(policy, dtype, stats))
    return {
        "timing/weight_sync_s": time.perf_counter() - t0,
        "perf/weight_sync_gb": stats["bytes"] / 1e9,
        "perf/weight_sync_gathered_gb": stats["gathered_bytes"] / 1e9,  # the full tensors' bytes, as gathered
        "perf/weight_sync_max_tensor_gb": stats["max_tensor_bytes"] / 1e9,
        "perf/weight_sync_tensors": float(stats["tensors"]),
    }
