"""Model families: what differs between Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense and MoE) lives here, and nowhere else.

The trainer, the packed and padded layouts, FSDP2, sharded loading, checkpoints, export and weight sync are the same
code for every family; each asks its model's :class:`Family` for what differs:

- the bundled files (tokenizer, chat template, processor, published configs: ``mm_gmpo/assets/<family>/``) and the
  tiny random model built from the family's real config (``model.path=tiny-random-qwen3-vl`` ...);
- the vision tower's call and outputs: Qwen3-VL also returns DeepStack features, which the decoder adds to the
  image tokens' hidden states after its first layers (``decoder_kwargs``), not only to the input embeddings;
- patch size and merge size (14 / 2 for Qwen2-VL and Qwen2.5-VL, 16 / 2 for Qwen3-VL: the resize rule follows the
  processor's ``patch_size``), LoRA's default target layers, and the memory plan's vision block width (which vision
  attention is windowed, Qwen2.5-VL's, is the vision config's own business: ``mm_gmpo.attention`` groups windows
  and whole images alike);
- multimodal RoPE: each family's own ``get_rope_index`` (Qwen3-VL interleaves the t/h/w sections), called with the
  same arguments for all three.

Weight names: every family's transformers names (``model.language_model.*``, ``model.visual.*``, ``lm_head.*``) are
what vLLM's loader for that family accepts, except a mixture of experts' fused expert tensors (``vllm_weights``);
checked for every family in the vLLM tier of the tests.
Qwen3-VL-MoE: the router's auxiliary (load-balancing) loss is off, as in verl and EasyR1 (the policy calls the
decoder, not the conditional-generation head that would add it); experts are fused 3-D parameters, sharded by FSDP2
with the rest of their decoder layer; full fine-tuning trains them, LoRA adapts the attention projections only
(the experts are not linear layers peft can adapt) and leaves them frozen.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mm_gmpo.config import ConfigError

ASSETS = Path(__file__).resolve().parent / "assets"
LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class VisionFeatures:
    """The vision tower's output for some images: ``embeds`` (image tokens, hidden) replace the placeholder tokens'
    input embeddings; ``deepstack`` (Qwen3-VL) holds one (image tokens, hidden) tensor per DeepStack level, added to
    the same tokens' hidden states after decoder layers 0, 1, ... (empty for the other families)."""

    embeds: torch.Tensor
    deepstack: list[torch.Tensor] = field(default_factory=list)

    def regroup(self, sizes: list[int], order: list[int]) -> VisionFeatures:
        """Features split in pieces of ``sizes`` tokens (one per distinct picture) and put together in ``order``
        (one piece per image: a picture shared by several images is computed once, used by each)."""

        def pick(t: torch.Tensor) -> torch.Tensor:
            parts = torch.split(t, sizes)
            return torch.cat([parts[k] for k in order])

        return VisionFeatures(pick(self.embeds), [pick(d) for d in self.deepstack])

    def split(self, sizes: list[int]) -> list[VisionFeatures]:
        """Consecutive pieces of ``sizes`` tokens (pictures' and clips' features from one tower call)."""
        pieces = [torch.split(t, sizes) for t in (self.embeds, *self.deepstack)]
        return [VisionFeatures(p[0], list(p[1:])) for p in zip(*pieces, strict=True)]

    @staticmethod
    def interleave(a: VisionFeatures, a_rows: torch.Tensor, b: VisionFeatures, b_rows: torch.Tensor) -> VisionFeatures:
        """Two sets of features (pictures', clips') merged into token order: ``a_rows`` / ``b_rows`` (bool, one per
        vision token of the sequence) say which token is whose. The embeddings are not needed merged (each kind
        replaces its own placeholders); the DeepStack features are, as the decoder adds them by position."""

        def merge(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = x.new_zeros(a_rows.shape[0], x.shape[-1])
            return out.index_put((a_rows.nonzero()[:, 0],), x).index_put((b_rows.nonzero()[:, 0],), y)

        return VisionFeatures(merge(a.embeds, b.embeds), [merge(x, y) for x, y in zip(a.deepstack, b.deepstack,
                                                                                       strict=True)])

    def total(self) -> torch.Tensor:
        """The sum of every value (a 0-weighted use of the whole tower, for the blank vision pass under FSDP)."""
        return self.embeds.sum() + sum((d.sum() for d in self.deepstack), torch.zeros((), device=self.embeds.device))


@dataclass(frozen=True)
class Family:
    name: str  # the bundled folder under mm_gmpo/assets
    title: str
    model_types: tuple[str, ...]  # transformers model_type values of this family
    configs: dict[str, str]  # bundled config name -> file under assets/<name>/configs
    hub_ids: dict[str, str]  # published hub id -> bundled config name (the memory plan reads these offline)
    vision_linears: tuple[str, ...]  # LoRA targets of a vision block (attn.* and mlp.*)
    deepstack: bool = False  # Qwen3-VL: DeepStack features enter the first decoder layers

    @property
    def assets(self) -> Path:
        return ASSETS / self.name

    def lm_linears(self, config) -> tuple[str, ...]:
        """LoRA's default target layers in each decoder layer: every linear layer; for a mixture of experts the
        attention projections only (its experts are fused 3-D parameters, not linear layers peft can adapt)."""
        return ATTENTION_LINEARS if is_moe(config) else LM_LINEARS

    def encode(self, visual: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> VisionFeatures:
        """The vision tower on ``pixel_values`` (the patches of the images of ``grid_thw``, in order)."""
        out = visual(pixel_values.type(visual.dtype), grid_thw=grid_thw)
        if isinstance(out, tuple):  # transformers 4.x Qwen3-VL: (merged, deepstack list); Qwen2/2.5-VL: a tensor
            return VisionFeatures(out[0], list(out[1]) if self.deepstack else [])
        embeds = getattr(out, "pooler_output", out)  # transformers 5: a model output holding the merged features
        return VisionFeatures(embeds, list(getattr(out, "deepstack_features", None) or []))

    def decoder_kwargs(self, visual_mask: torch.Tensor | None, features: VisionFeatures | None) -> dict:
        """What the language model takes beside its input embeddings: Qwen3-VL's DeepStack features and where
        the image tokens are (``visual_mask``, the shape of the input ids); nothing for the other families."""
        if not self.deepstack or features is None or not features.deepstack:
            return {}
        return {"visual_pos_masks": visual_mask, "deepstack_visual_embeds": features.deepstack}

    def rope_index(self, model: nn.Module, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
                   image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                   second_per_grid_ts: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                   **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, B, L) M-RoPE positions and (B, 1) deltas, as transformers' ``get_rope_index`` (same arguments), by
        the rule the released models and vLLM use: the text after a picture or clip continues from its largest
        position + 1. transformers 5.x continues from its start + its larger side, which is the same for pictures
        and Qwen3-VL's one-frame clip groups, but not for a Qwen2-VL / Qwen2.5-VL clip whose time positions run past
        its sides (4 temporal patches at 2 fps reach 6 in a 2x3 grid): there transformers' own forward would score
        prompts the engine never saw. ``model``: the inner model (its ``config``; transformers' ``get_rope_index``)."""
        if self.deepstack or video_grid_thw is None:  # transformers' rule is the released one here
            # the class's method: an HF engine's model has this function bound in its place
            return type(model).get_rope_index(model, input_ids, mm_token_type_ids=mm_token_type_ids,
                                              image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                                              second_per_grid_ts=second_per_grid_ts, attention_mask=attention_mask)
        vision = model.config.vision_config
        merge, per_second = vision.spatial_merge_size, getattr(vision, "tokens_per_second", None)
        grids = {1: iter(image_grid_thw if image_grid_thw is not None else []), 2: iter(video_grid_thw)}
        seconds = iter(second_per_grid_ts.tolist() if second_per_grid_ts is not None else [])
        pos = torch.zeros(3, *input_ids.shape, dtype=torch.long, device=input_ids.device)
        deltas = []
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b].bool() if attention_mask is not None else torch.ones_like(input_ids[b], dtype=torch.bool)
            at, parts = 0, []
            for kind, run in itertools.groupby(mm_token_type_ids[b][keep].tolist()):
                n = len(list(run))
                if kind == 0:
                    parts.append(torch.arange(n, device=input_ids.device).expand(3, -1) + at)
                    at += n
                    continue
                interval = per_second * next(seconds) if kind == 2 and per_second else 1.0
                block = vision_positions(at, next(grids[kind]), merge, interval, input_ids.device)
                parts.append(block)
                at = int(block.max()) + 1
            row = torch.cat(parts, 1)
            pos[:, b, keep] = row
            deltas.append(int(row.max()) + 1 - int(keep.sum()))
        return pos, torch.tensor(deltas, device=input_ids.device)[:, None]

    def vision_block_width(self, vision_config) -> int:
        """Hidden size inside a vision block (Qwen2-VL calls it embed_dim; its hidden_size is the output's)."""
        return getattr(vision_config, "embed_dim", None) or vision_config.hidden_size


def vision_positions(start: int, grid: torch.Tensor, merge: int, interval: float, device=None) -> torch.Tensor:
    """(3, t*h*w) positions of a picture's or clip's tokens starting at ``start``: time index x ``interval``
    (Qwen2.5-VL: tokens per second x seconds per temporal patch), truncated after the product (as vLLM), and the
    merged row and column indices."""
    t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    tt = (torch.arange(t, dtype=torch.float64, device=device) * interval).long()
    hh, ww = torch.arange(h, device=device), torch.arange(w, device=device)
    return torch.stack(torch.meshgrid(tt, hh, ww, indexing="ij")).reshape(3, -1) + start


def _tiny_vl(family: str, file: str, *, text: dict, vision: dict):
    """A family's tiny config: a real published config (real vocabulary, special tokens, vision patch and merge
    sizes, RoPE layout) with every width and depth made small: text hidden 64, 2 decoder layers, head_dim 32 (so
    mrope_section [4, 6, 6] sums to head_dim / 2), vision depth 2, the vision output = the text hidden size."""
    from mm_gmpo.models import model_config

    return model_config(ASSETS / family / "configs" / file, **text, vision=vision)


_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


def tiny_qwen2_5_vl_config(hidden_size: int = 64, layers: int = 2, vision_depth: int = 2):
    """Qwen2.5-VL-3B's config made tiny (``tiny-random``, the built-in task's policy); the last vision block attends
    in full, the others within windows, as in the real model."""
    from mm_gmpo.models import model_config

    return model_config(
        ASSETS / "qwen2_5_vl" / "configs" / "qwen2_5_vl_3b_instruct.json", hidden_size=hidden_size,
        intermediate_size=2 * hidden_size, num_hidden_layers=layers, num_attention_heads=hidden_size // 32,
        num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
        vision=dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2,
                    out_hidden_size=hidden_size, fullatt_block_indexes=[vision_depth - 1]),
    )


def tiny_qwen2_vl_config():
    """Qwen2-VL-2B's config made tiny (``tiny-random-qwen2-vl``)."""
    return _tiny_vl("qwen2_vl", "qwen2_vl_2b_instruct.json",
                    text={**_TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}},
                    vision=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64))


_QWEN3_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                     deepstack_visual_indexes=[0], num_position_embeddings=256)
_QWEN3_ROPE = {"rope_type": "default", "mrope_interleaved": True, "mrope_section": [4, 6, 6]}


def tiny_qwen3_vl_config():
    """Qwen3-VL-2B's config made tiny (``tiny-random-qwen3-vl``): one DeepStack level (after vision block 0)."""
    return _tiny_vl("qwen3_vl", "qwen3_vl_2b_instruct.json", text={**_TEXT, "head_dim": 32, "rope_scaling": _QWEN3_ROPE},
                    vision=_QWEN3_VISION)


def tiny_qwen3_vl_moe_config():
    """Qwen3-VL-30B-A3B's config made tiny (``tiny-random-qwen3-vl-moe``): 4 experts, 2 per token."""
    return _tiny_vl("qwen3_vl", "qwen3_vl_30b_a3b_instruct.json",
                    text={**_TEXT, "head_dim": 32, "rope_scaling": _QWEN3_ROPE, "num_experts": 4,
                          "num_experts_per_tok": 2, "moe_intermediate_size": 32}, vision=_QWEN3_VISION)


QWEN2_VL = Family(
    "qwen2_vl", "Qwen2-VL", ("qwen2_vl",),
    configs={"qwen2_vl_2b": "qwen2_vl_2b_instruct.json", "qwen2_vl_7b": "qwen2_vl_7b_instruct.json"},
    hub_ids={"Qwen/Qwen2-VL-2B-Instruct": "qwen2_vl_2b", "Qwen/Qwen2-VL-7B-Instruct": "qwen2_vl_7b"},
    vision_linears=("qkv", "proj", "fc1", "fc2"))
QWEN2_5_VL = Family(
    "qwen2_5_vl", "Qwen2.5-VL", ("qwen2_5_vl",),
    configs={"qwen2_5_vl_3b": "qwen2_5_vl_3b_instruct.json", "qwen2_5_vl_7b": "qwen2_5_vl_7b_instruct.json"},
    hub_ids={"Qwen/Qwen2.5-VL-3B-Instruct": "qwen2_5_vl_3b", "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2_5_vl_7b"},
    vision_linears=("qkv", "proj", "gate_proj", "up_proj", "down_proj"))
QWEN3_VL = Family(
    "qwen3_vl", "Qwen3-VL", ("qwen3_vl", "qwen3_vl_moe"),
    configs={"qwen3_vl_2b": "qwen3_vl_2b_instruct.json", "qwen3_vl_4b": "qwen3_vl_4b_instruct.json",
             "qwen3_vl_8b": "qwen3_vl_8b_instruct.json", "qwen3_vl_32b": "qwen3_vl_32b_instruct.json",
             "qwen3_vl_30b_a3b": "qwen3_vl_30b_a3b_instruct.json"},
    hub_ids={f"Qwen/Qwen3-VL-{size}-Instruct": f"qwen3_vl_{size.lower().replace('-', '_')}"
             for size in ("2B", "4B", "8B", "32B", "30B-A3B")},
    vision_linears=("qkv", "proj", "linear_fc1", "linear_fc2"), deepstack=True)
FAMILIES = (QWEN2_VL, QWEN2_5_VL, QWEN3_VL)

# model_type values of families not supported yet -> what to say
NOT_YET = {"qwen3_5": "Qwen3.5", "qwen3_5_moe": "Qwen3.5", "qwen3_next": "Qwen3-Next",
           "qwen3_omni_moe": "Qwen3-Omni"}

TINY_MODELS = {"tiny-random": tiny_qwen2_5_vl_config, "tiny-random-qwen2-vl": tiny_qwen2_vl_config,
               "tiny-random-qwen3-vl": tiny_qwen3_vl_config, "tiny-random-qwen3-vl-moe": tiny_qwen3_vl_moe_config}


def bundled_configs() -> dict[str, Path]:
    """Every bundled config by name (qwen2_5_vl_7b, qwen3_vl_8b, ...)."""
    return {n: ASSETS / f.name / "configs" / file for f in FAMILIES for n, file in f.configs.items()}


def bundled_name(path: str) -> str | None:
    """The bundled config of a published hub id (Qwen/Qwen3-VL-8B-Instruct -> qwen3_vl_8b), else None."""
    return next((f.hub_ids[path] for f in FAMILIES if path in f.hub_ids), None)


class UnsupportedModel(ConfigError):
    """A model whose family mm_gmpo does not train (yet): a user error, told in one line."""


def family_of(config) -> Family | None:
    """The family of a transformers config; None for a text-only model (no vision tower); UnsupportedModel for a
    vision-language model of another family."""
    model_type = getattr(config, "model_type", "")
    if model_type in NOT_YET:
        raise UnsupportedModel(f"{NOT_YET[model_type]} ({model_type}) is not supported yet: its hybrid linear "
                               "attention needs its own packed layout and vLLM weight sync; use a Qwen2-VL, "
                               "Qwen2.5-VL or Qwen3-VL model")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    if hasattr(config, "vision_config"):
        raise UnsupportedModel(f"model_type {model_type!r} is not a supported vision-language family; supported: "
                               + ", ".join(f"{f.title} ({'/'.join(f.model_types)})" for f in FAMILIES))
    return None


def vllm_weights(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers' names and layouts as vLLM's loaders take them: unchanged for every family, except a mixture of
    experts' fused expert tensors (transformers: ``mlp.experts.gate_up_proj`` (E, 2I, H) and ``mlp.experts.down_proj``
    (E, H, I)), which are sent one expert at a time as the linear weights vLLM's Qwen3-MoE loader names
    ``mlp.experts.{e}.gate_proj.weight`` (I, H), ``up_proj.weight`` (I, H) and ``down_proj.weight`` (H, I): views of
    the gathered tensor, no copy."""
    for name, t in named_tensors:
        if name.endswith(".mlp.experts.gate_up_proj") and t.dim() == 3:
            prefix, inter = name.removesuffix("gate_up_proj"), t.shape[1] // 2
            for e in range(t.shape[0]):
                yield f"{prefix}{e}.gate_proj.weight", t[e, :inter]
                yield f"{prefix}{e}.up_proj.weight", t[e, inter:]
        elif name.endswith(".mlp.experts.down_proj") and t.dim() == 3:
            prefix = name.removesuffix("down_proj")
            for e in range(t.shape[0]):
                yield f"{prefix}{e}.down_proj.weight", t[e]
        else:
            yield name, t


def is_moe(config) -> bool:
    """Whether the language model is a mixture of experts."""
    text = getattr(config, "text_config", config)
    return bool(getattr(text, "num_experts", 0))


def processor_dir(config) -> Path:
    """The bundled tokenizer/processor folder of a config's family (Qwen2.5-VL's for a text-only Qwen2)."""
    family = family_of(config)
    return (family or QWEN2_5_VL).assets
