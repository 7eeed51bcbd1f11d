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

from mm_gmpo.families import TINY_MODELS, bundled_configs, family_of, is_moe, processor_dir
from mm_gmpo.families import tiny_qwen2_5_vl_config as tiny_qwen2_5_vl_config  # re-exported

MODEL_CONFIGS = bundled_configs()  # qwen2_5_vl_7b, qwen3_vl_8b, qwen3_vl_30b_a3b, qwen2_vl_2b, ...


def model_config(source: str | Path | dict, **overrides):
    """A transformers config from a bundled name (``MODEL_CONFIGS``: qwen2_5_vl_7b, qwen3_vl_8b, ...), a
    config.json, or a dict.

    ``overrides`` set text fields (hidden_size, num_hidden_layers, ...: in ``text_config`` where the file has one,
    else at the top level, as Qwen2/2.5-VL files do) and, through ``vision=dict``, vision fields.
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
    if "text_config" in raw:
        raw["text_config"] = {**raw["text_config"], **overrides}
    else:
        raw.update(overrides)
    if vision:
        raw["vision_config"] = {**raw.get("vision_config", {}), **vision}
    model_type = raw.get("model_type")
    cls = AutoConfig.for_model(model_type).__class__
    return cls.from_dict(raw)


def tiny_qwen2_config(hidden_size: int = 128, layers: int = 2):
    """A text-only Qwen2 config (the Qwen2.5 / Qwen2.5-Math family: real vocab and special tokens) but tiny: the
    policy of the built-in text-math task (``configs/tiny_math.yaml``)."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=151936, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=layers, num_attention_heads=hidden_size // 32, num_key_value_heads=1,
                       max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=151643,
                       eos_token_id=151645, rope_theta=1_000_000.0)


TINY = {**TINY_MODELS, "tiny-random-text": tiny_qwen2_config}


def is_random_model(path: str) -> bool:
    """Whether a model path names random weights: 'tiny-random' (Qwen2.5-VL), 'tiny-random-qwen2-vl',
    'tiny-random-qwen3-vl', 'tiny-random-qwen3-vl-moe', 'tiny-random-text' (Qwen2) or 'random:NAME' (see
    random_model_config)."""
    return path in TINY or path.startswith("random:")


def random_model_config(path: str):
    """The config of a random-initialised policy ('tiny-random', or 'random:NAME' with NAME a bundled config such
    as qwen2_5_vl_3b or a config.json path), or None when ``path`` names real weights."""
    if not is_random_model(path):
        return None
    return TINY[path]() if path in TINY else model_config(path.removeprefix("random:"))


def processor_source(path: str) -> str | Path:
    """Where a model's processor/tokenizer comes from: its family's bundled files for a random model (tiny-random,
    tiny-random-qwen3-vl, random:qwen3_vl_8b, ...), else the model folder or hub id itself."""
    cfg = random_model_config(path)
    return path if cfg is None else processor_dir(cfg)


def check_model_source(path: str, key: str = "model.path") -> None:
    """Raise ConfigError naming ``key`` when ``path`` is neither a random model, a model folder (with config.json)
    nor a hub id that can be had: a local-looking path that does not exist, or a hub id that is not in the local
    cache while the hub is off (``HF_HUB_OFFLINE``). Other hub ids are left to the loader (it downloads them)."""
    import os

    from mm_gmpo.config import ConfigError

    if is_random_model(path):
        return
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"{key}: {path!r} is a file; give the model folder (the one holding config.json)")
        if not (p / "config.json").exists() and not (p / "tokenizer_config.json").exists():
            raise ConfigError(f"{key}: the folder {p.resolve()} has no config.json: not a transformers model folder")
        if (p / "config.json").exists():
            _check_family(p / "config.json", key)
        return
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ConfigError(f"{key}: no model folder or hub id {path!r}: the folder {p.resolve()} does not exist (and "
                          "a hub id has the form org/name)")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, "config.json"), str):
            raise ConfigError(f"{key}: no model folder or hub id {path!r}: the folder {p.resolve()} does not exist, "
                              "and the hub id is not in the local cache while HF_HUB_OFFLINE is set; download it "
                              "first (huggingface-cli download), or give a model folder")


def _check_family(config_json: Path, key: str) -> None:
    """Raise ConfigError naming ``key`` when a model folder's config.json is of a family mm_gmpo does not train."""
    from types import SimpleNamespace

    from mm_gmpo.config import ConfigError

    try:
        raw = json.loads(config_json.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {config_json} is not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: {config_json} holds no JSON object")
    config = SimpleNamespace(model_type=raw.get("model_type", ""))
    if "vision_config" in raw:
        config.vision_config = raw["vision_config"]
    try:
        family_of(config)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None


def write_model_folder(dest: str | Path, config) -> Path:
    """A model folder without weights: ``config.json`` plus the bundled tokenizer/processor files of its family.

    What vLLM needs with ``load_format="dummy"`` (benchmarks, GPU tests) and what ``from_pretrained`` needs to
    build the tokenizer and processor. ``config``: a transformers config or a name accepted by model_config.
    """
    import shutil

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cfg = config if hasattr(config, "to_json_file") else model_config(config)
    cfg.to_json_file(dest / "config.json")
    for f in processor_dir(cfg).iterdir():
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
    family_of(cfg)  # UnsupportedModel (one line) for a family mm_gmpo does not train
    is_vlm = hasattr(cfg, "vision_config")
    auto = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    kw = experts_kwargs(cfg, dtype)
    if random_init:
        torch.manual_seed(seed)
        cfg._attn_implementation = attn_implementation
        with torch.device(device or "cpu"):
            model = auto.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation, **kw)
    else:
        model = auto.from_pretrained(str(source), dtype=dtype, attn_implementation=attn_implementation, **kw)
    return model


def experts_kwargs(config, dtype: torch.dtype) -> dict:
    """A mixture of experts in float64 (the exactness tests) runs its experts one by one: transformers' default
    grouped matmul takes fp32/bf16/fp16 only."""
    return {"experts_implementation": "eager"} if is_moe(config) and dtype == torch.float64 else {}


# ---------------------------------------------------------------- building on the meta device, filling by rows


def loads_sharded(load: str, path: str) -> bool:
    """Whether ``model.load`` (auto | sharded | full) builds on the meta device and fills shards: auto does for every
    model but the built-in tiny-random one (built whole, as the built-in task's trajectory was measured)."""
    return load == "sharded" or (load == "auto" and path not in TINY)


def empty_model(config, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "auto") -> nn.Module:
    """The model of ``config`` with its parameters on the meta device (no memory) and its buffers (the rotary
    tables, computed from the config) real, on the CPU: what ``mm_gmpo.distributed.materialize`` fills after
    ``parallelize`` has sharded it."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    attn_implementation = resolve_attention(attn_implementation)
    family_of(config)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    config._attn_implementation = attn_implementation
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                 **experts_kwargs(config, dtype))
    model.tie_weights()  # from_config ties on a real device only: a tied head must stay one parameter
    return model


class CheckpointSource:
    """Rows of the model's parameters read from its safetensors files, one slice at a time (memory-mapped: a rank
    that asks for its rows reads those rows, never the whole tensor).

    Checkpoint keys are mapped to the model's parameter names with transformers' own conversion mapping (Qwen2.5-VL
    checkpoints say ``model.layers.N``, transformers 5 modules ``model.language_model.layers.N``); LoRA's
    ``.base_layer`` reads its linear layer's weight. ``bytes_read`` counts what was read,
    ``largest_held`` the largest slice held at once.
    """

    def __init__(self, model: nn.Module, folder: str | Path, seed: int = 0):
        from safetensors import safe_open
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        self.files = checkpoint_files(folder)
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        plain = {n.replace(".base_layer.", "."): n for n, _ in model.named_parameters()}
        meta = dict.fromkeys(plain)  # rename_source_key only asks whether a name exists
        self._handles = [safe_open(str(f), framework="pt") for f in self.files]
        self.where: dict[str, tuple[int, str]] = {}  # parameter name -> (file index, checkpoint key)
        self.swap: dict[str, tuple[int, int]] = {}  # parameter name -> dims transposed between checkpoint and model
        self._shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        for i, handle in enumerate(self._handles):
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                name, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
                if converter is not None and name in plain:  # rename_source_key gives the matched source pattern
                    conv = next((c for c in converters if converter in c.source_patterns), converter)
                    self.swap[plain[name]] = _row_preserving_transpose(conv, key, self.files[i])
                if name in plain:
                    self.where[plain[name]] = (i, key)
        lora = (".lora_A.", ".lora_B.")
        missing = [n for n in plain.values() if n not in self.where and not any(s in n for s in lora)]
        if missing:
            raise ValueError(f"{folder}: no checkpoint tensor for {len(missing)} parameters, e.g. {missing[:3]}: "
                             "is this the model that config.json describes?")
        self.adapters = RandomSource(model, seed, only=lora)  # LoRA adapters start fresh, as peft starts them
        self.bytes_read = self.largest_held = 0

    def read(self, name: str, rows: slice) -> torch.Tensor:
        if name not in self.where:
            return self.adapters.read(name, rows)
        i, key = self.where[name]
        sl = self._handles[i].get_slice(key)
        part = sl[rows]
        if name in self.swap and tuple(sl.get_shape()) != self._shapes[name]:  # e.g. fused experts (E, H, 2I)
            part = part.transpose(*self.swap[name]).contiguous()
        self.bytes_read += part.numel() * part.element_size()
        self.largest_held = max(self.largest_held, part.numel() * part.element_size())
        return part


def _row_preserving_transpose(converter, key: str, file: Path) -> tuple[int, int]:
    """The dims of a converter that only transposes dims other than 0 (a mixture of experts' fused expert tensors,
    stored (experts, in, out) and used (experts, out, in)): rows (experts) read from the checkpoint are the model's
    rows, transposed. Any other conversion needs the whole tensor: model.load=full."""
    from transformers.core_model_loading import Transpose

    ops = list(getattr(converter, "operations", []))
    if len(ops) == 1 and isinstance(ops[0], Transpose) and 0 not in (ops[0].dim0, ops[0].dim1):
        return ops[0].dim0, ops[0].dim1
    raise ValueError(f"{file}: {key} needs transformers' weight conversion ({converter}); load this model with "
                     "model.load=full")


class RandomSource:
    """Rows of freshly initialised parameters, the same values whatever rows are asked for and in what order: each
    leaf module (at most one embedding matrix) is initialised on its own, on the CPU, by transformers'
    ``_init_weights`` under a seed derived from ``seed`` and its name, so a random model is identical on any
    number of ranks. LoRA adapters start as peft starts them: A Kaiming-uniform, B zero. ``largest_held``: the
    largest module held at once (an embedding matrix: a random model costs one full tensor per rank, not a shard)."""

    def __init__(self, model: nn.Module, seed: int, only: tuple[str, ...] = ()):
        import copy

        self.model, self.seed = model, seed
        self.leaf: dict[str, tuple[str, nn.Module]] = {}  # parameter name -> (module name, meta copy of module)
        for mname, module in model.named_modules():
            direct = list(module.named_parameters(recurse=False))
            if direct and (not only or any(s in f"{mname}." for s in only)):
                # a leaf, or a module whose children hold no parameters (a mixture of experts' fused experts and
                # their activation function)
                leaf = not any(True for c in module.children() for _ in c.parameters())
                meta_copy = copy.deepcopy(module) if leaf else None
                for pname, _ in direct:
                    self.leaf[f"{mname}.{pname}" if mname else pname] = (mname, meta_copy)
        self._cached: tuple[str, dict[str, torch.Tensor]] | None = None
        self.bytes_read = self.largest_held = 0

    def _module_tensors(self, mname: str, meta_copy: nn.Module | None) -> dict[str, torch.Tensor]:
        import zlib

        if meta_copy is None:
            raise ValueError(f"{mname} holds parameters of its own and children with parameters: no per-module "
                             "init for it")
        module = meta_copy.to_empty(device="cpu")
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed * 1_000_003 + zlib.crc32(mname.encode()))
        with torch.no_grad():
            if ".lora_B." in mname + ".":
                module.weight.zero_()
            elif ".lora_A." in mname + ".":
                module.reset_parameters()
            else:
                self.model._init_weights(module)
        torch.random.set_rng_state(gen_state)
        return {n: t.detach() for n, t in module.named_parameters(recurse=False)}

    def read(self, name: str, rows: slice) -> torch.Tensor:
        mname, meta_copy = self.leaf[name]
        if self._cached is None or self._cached[0] != mname:
            self._cached = (mname, self._module_tensors(mname, meta_copy))
            held = sum(t.numel() * t.element_size() for t in self._cached[1].values())
            self.largest_held = max(self.largest_held, held)  # the whole module exists while its rows are read
        part = self._cached[1][name.removeprefix(mname + ".") if mname else name][rows]
        self.bytes_read += part.numel() * part.element_size()
        return part


def checkpoint_files(source: str | Path) -> list[Path]:
    """The safetensors files of a model folder or hub name (a hub name is downloaded to the cache first)."""
    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(str(source), allow_patterns=["*.safetensors", "*.json"]))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json; sharded loading "
                            "reads safetensors only: set model.load=full to load other formats")


def torch_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    """'bf16', 'fp32', or 'auto' (bf16 on a GPU, fp32 on a CPU) as a torch dtype."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device or "cpu").type == "cuda" else torch.float32
    if name not in ("bf16", "fp32"):
        raise ValueError(f"dtype {name!r}: choose auto, bf16 or fp32")
    return torch.bfloat16 if name == "bf16" else torch.float32
