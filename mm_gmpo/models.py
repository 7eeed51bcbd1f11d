"""Models: configs (bundled or from a folder), building and loading a transformers (V)LM, compiling its blocks.

``build_model`` gives a whole model on one device (small models, the rollout engine); ``empty_model`` builds one
on the meta device for ``mm_gmpo.distributed.materialize`` to shard first and fill afterwards, each rank reading
only its own rows of every tensor (``CheckpointSource``) or initialising them (``RandomSource``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mm_gmpo.data.processing import DEFAULT_PROCESSOR_DIR as ASSETS  # the bundled processor and model configs

MODEL_CONFIGS = {"qwen2_5_vl_3b": ASSETS / "configs" / "qwen2_5_vl_3b_instruct.json",
                 "qwen2_5_vl_7b": ASSETS / "configs" / "qwen2_5_vl_7b_instruct.json"}

def model_config(source: str | Path | dict, **overrides):
    """A transformers config from a bundled name ('qwen2_5_vl_3b'/'qwen2_5_vl_7b'), a config.json, or a dict.

    ``overrides`` set top-level text fields (hidden_size, num_hidden_layers, ...) and, through ``vision=dict``,
    vision fields.
    """
    from transformers import AutoConfig

    if isinstance(source, dict):
        raw = dict(source)
    else:
        path = MODEL_CONFIGS.get(str(source), Path(source))
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            return AutoConfig.from_pretrained(str(source))  # a hub name
        raw = json.loads(path.read_text())
    vision = overrides.pop("vision", None)
    raw.update(overrides)
    if vision:
        raw["vision_config"] = {**raw.get("vision_config", {}), **vision}
    model_type = raw.get("model_type")
    cls = AutoConfig.for_model(model_type).__class__
    return cls.from_dict(raw)


def tiny_qwen2_5_vl_config(hidden_size: int = 64, layers: int = 2, vision_depth: int = 2):
    """A Qwen2.5-VL config shaped like the real 3B (real vocab and special tokens) but tiny, for CPU tests.

    head_dim = 32 so mrope_section = [4, 6, 6] (must sum to head_dim / 2); vision out_hidden_size = text hidden.
    """
    return model_config(
        "qwen2_5_vl_3b", hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=hidden_size // 32, num_key_value_heads=1,
        rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
        vision=dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2,
                    out_hidden_size=hidden_size, fullatt_block_indexes=[vision_depth - 1]),
    )


def is_random_model(path: str) -> bool:
    """Whether a model path names random weights: 'tiny-random' or 'random:NAME' (see random_model_config)."""
    return path == "tiny-random" or path.startswith("random:")


def random_model_config(path: str):
    """The config of a random-initialised policy ('tiny-random', or 'random:NAME' with NAME a bundled config such
    as qwen2_5_vl_3b or a config.json path), or None when ``path`` names real weights."""
    if not is_random_model(path):
        return None
    return tiny_qwen2_5_vl_config() if path == "tiny-random" else model_config(path.removeprefix("random:"))


def write_model_folder(dest: str | Path, config) -> Path:
    """A model folder without weights: ``config.json`` plus the bundled tokenizer/processor files.

    What vLLM needs with ``load_format="dummy"`` (benchmarks, GPU tests) and what ``from_pretrained`` needs to
    build the tokenizer and processor. ``config``: a transformers config or a name accepted by model_config.
    """
    import shutil

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cfg = config if hasattr(config, "to_json_file") else model_config(config)
    cfg.to_json_file(dest / "config.json")
    for f in ASSETS.iterdir():
        if f.is_file() and f.name != "README.md":
            shutil.copy2(f, dest / f.name)
    return dest


def resolve_attention(name: str) -> str:
    """'auto' -> flash_attention_2 when flash-attn is installed and a GPU is present, else sdpa; others unchanged."""
    if name != "auto":
        return name
    import importlib.util

    return "flash_attention_2" if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") else "sdpa"


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` the MLP and RMSNorms of every decoder layer and vision block, in place; returns how many
    modules were compiled.

    These are the regions of a layer without host reads or data-dependent control flow, so each compiles to whole
    graphs (no breaks): the SiLU-and-multiply and the norms' casts, square, mean and scale fuse into a few kernels
    instead of a dozen memory-bound ones per layer. Identical layers share one compiled graph; token counts are
    dynamic, so packed micro-batches of any length do not recompile. The first forward pays the compile time.
    """
    lm = getattr(model.model, "language_model", model.model)
    visual = getattr(model.model, "visual", None)
    n = 0
    for layer in [*lm.layers, *(visual.blocks if visual is not None else [])]:
        for name in ("mlp", "input_layernorm", "post_attention_layernorm", "norm1", "norm2"):
            sub = getattr(layer, name, None)
            if sub is not None:
                sub.compile(dynamic=True)
                n += 1
    return n


def build_model(
    source: str | Path,
    *,
    random_init: bool = False,
    config=None,
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "auto",
    seed: int = 0,
    device: str | torch.device | None = None,
) -> nn.Module:
    """A transformers model: pretrained weights from a path/hub name, or random weights from a config.

    ``attn_implementation``: as transformers, plus 'auto' (see resolve_attention). Random-initialised models are
    for speed and plumbing checks only; ``device`` is where they are initialised (a GPU initialises a 7B model in
    about a second, a CPU takes tens of seconds).
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    attn_implementation = resolve_attention(attn_implementation)

    cfg = config if config is not None else model_config(source)
    is_vlm = hasattr(cfg, "vision_config")
    auto = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    if random_init:
        torch.manual_seed(seed)
        cfg._attn_implementation = attn_implementation
        with torch.device(device or "cpu"):
            model = auto.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    else:
        model = auto.from_pretrained(str(source), dtype=dtype, attn_implementation=attn_implementation)
    return model
