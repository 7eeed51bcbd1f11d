"""LoRA adapters with ``peft``, injected into the transformers model in place (no wrapper class, so the policy,
FSDP2 and checkpoint code see the same module tree, with ``<linear>.base_layer`` / ``lora_A`` / ``lora_B`` inside).

Only the adapters train: base weights (and, unless ``vision=True``, the whole vision tower, as EasyR1 does) are
frozen, so gradients and optimizer state exist for the adapters alone. Whatever leaves the trainer leaves merged:
:func:`merge_lora` turns a stream of (name, tensor) pairs with adapters into the plain model's names and weights
(``W + scaling * B @ A``), one linear layer at a time, so a weight sync or an export never holds a second model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mm_gmpo.families import LM_LINEARS, family_of

_PART = re.compile(r"^(?P<prefix>.+)\.(?:base_layer\.(?P<base>weight|bias)|lora_(?P<ab>[AB])\.[^.]+\.weight)$")


def target_pattern(target_modules: Iterable[str], vision_targets: Iterable[str] = ()) -> str:
    """A full-match regex over module names: the named linear layers of the decoder layers (a VLM's
    ``model.language_model.layers.N``, a text LM's ``model.layers.N``), and ``vision_targets`` of the vision blocks."""
    names = "|".join(re.escape(n) for n in target_modules)
    lm = rf"model\.(?:language_model\.)?layers\.\d+\.(?:self_attn|mlp)\.(?:{names})"
    vision_targets = list(vision_targets)
    if not vision_targets:
        return lm
    vis = rf"model\.visual\.blocks\.\d+\.(?:attn|mlp)\.(?:{'|'.join(re.escape(n) for n in vision_targets)})"
    return f"(?:{lm}|{vis})"


def add_lora(model: nn.Module, *, rank: int, alpha: float, target_modules: Iterable[str] = (),
             vision: bool = False, modules_to_save: Iterable[str] = ()) -> int:
    """Inject LoRA adapters (dropout 0, B = 0 at start: the model is unchanged) and freeze everything else, except
    the parameters of ``modules_to_save`` (module names, full-match regexes, e.g. ``model.language_model.norm``),
    which train in full as peft's option of that name does (in place here: their names do not change).
    ``target_modules`` empty: the model family's default (``mm_gmpo.families``: every linear layer of a decoder
    layer; a mixture of experts' attention projections). ``vision``: also the family's vision block linears.
    Returns the number of adapted linear layers."""
    from peft import LoraConfig, inject_adapter_in_model

    family = family_of(model.config)
    target_modules = list(target_modules) or list(family.lm_linears(model.config) if family else LM_LINEARS)
    vision_targets = family.vision_linears if vision and family is not None else ()
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                        target_modules=target_pattern(target_modules, vision_targets))
    inject_adapter_in_model(config, model)
    full = [re.compile(m) for m in modules_to_save]
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        p.requires_grad_(".lora_A." in name or ".lora_B." in name or any(r.fullmatch(module) for r in full))
    missing = [r.pattern for r in full if not any(r.fullmatch(n) for n, _ in model.named_modules())]
    if missing:
        raise ValueError(f"model.lora.modules_to_save: no module is named {missing}")
    n = len(lora_scalings(model))
    if n == 0:
        raise ValueError(f"LoRA matched no linear layer for target_modules={list(target_modules)}")
    return n


def lora_scalings(model: nn.Module) -> dict[str, float]:
    """``{linear layer name: scaling}`` for every adapted layer (empty without LoRA)."""
    if not has_lora(model):  # no peft import on the full fine-tuning path
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: float(m.scaling[m.active_adapters[0]]) for name, m in model.named_modules()
            if isinstance(m, LoraLayer)}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its frozen base inside the block: every LoRA layer computes ``W x`` alone (peft's
    ``enable_adapters(False)``), the reference policy of a LoRA run without a second copy of the model. The
    adapters' ``requires_grad`` flags are restored afterwards."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    flags = {p: p.requires_grad for m in layers for p in m.parameters()}
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def has_lora(module: nn.Module) -> bool:
    return any(".lora_A." in n for n, _ in module.named_parameters())


def is_lora_part(name: str, scalings: dict[str, float]) -> bool:
    """Whether ``name`` is an adapted layer's base weight, bias or adapter (``merge_lora`` combines them)."""
    m = _PART.match(name)
    return m is not None and m["prefix"] in scalings


def merge_lora(named: Iterable[tuple[str, torch.Tensor]], scalings: dict[str, float]) -> Iterator[
        tuple[str, torch.Tensor]]:
    """The plain model's (name, tensor) pairs from a stream with adapters: ``<layer>.base_layer.weight`` +
    ``lora_A`` / ``lora_B`` become ``<layer>.weight = W + scaling * B @ A`` (computed in float32, returned in W's
    dtype), ``<layer>.base_layer.bias`` becomes ``<layer>.bias``; other tensors pass through. Only one layer's
    three tensors are held at a time."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in named:
        m = _PART.match(name)
        if m is None or m["prefix"] not in scalings:
            yield name, t
            continue
        prefix = m["prefix"]
        if m["base"] == "bias":
            yield f"{prefix}.bias", t
            continue
        parts = pending.setdefault(prefix, {})
        parts[m["ab"] or "W"] = t
        if len(parts) == 3:
            del pending[prefix]
            w = parts["W"]
            merged = w.float() + scalings[prefix] * (parts["B"].float() @ parts["A"].float())
            yield f"{prefix}.weight", merged.to(w.dtype)
    if pending:
        raise RuntimeError(f"LoRA merge: incomplete layers {sorted(pending)[:3]} (a base weight or adapter missing)")


def adapter_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a full state dict, named as PEFT's ``adapter_model.safetensors`` names them."""
    out = {}
    for name, t in state.items():
        m = _PART.match(name)
        if m is not None and m["ab"]:
            out[f"base_model.model.{m['prefix']}.lora_{m['ab']}.weight"] = t.contiguous()
    return out


def save_adapter(model: nn.Module, state: dict[str, torch.Tensor], out_dir) -> None:
    """A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) that
    ``peft.PeftModel.from_pretrained(base_model, out_dir)`` loads."""
    from pathlib import Path

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.peft_config["default"]
    config.save_pretrained(str(out_dir))
    save_file(adapter_state_dict(state), str(out_dir / "adapter_model.safetensors"))
