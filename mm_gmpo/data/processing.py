"""Prompt -> model inputs with the model family's real processor (or a plain tokenizer for text-only models).

Images are resized once, here, with qwen-vl-utils' ``fetch_image`` (same rule as Qwen's own pipeline and vLLM's
Qwen-VL processors: sides a multiple of patch size x merge size, 28 for Qwen2/2.5-VL, 32 for Qwen3-VL), and the
processor is told not to resize them again: the resized images are kept on :class:`EncodedPrompt` and are what both
the trainer and the rollout engine use, so train- and inference-time vision tokens cannot disagree.

The count of ``<|image_pad|>`` tokens is checked against ``image_grid_thw`` for every prompt, so the transformers
error "Image features and image tokens do not match" cannot happen later in a training step; a mismatch raises a
DataError naming the prompt.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mm_gmpo.data.prompts import DataError, Prompt
from mm_gmpo.families import QWEN2_5_VL

log = logging.getLogger(__name__)
DEFAULT_PROCESSOR_DIR = QWEN2_5_VL.assets  # the default run's family
# EasyR1's Geometry3K defaults; diagrams (~260x275) are upscaled to >= 512x512 pixels
DEFAULT_MIN_PIXELS = 262_144
DEFAULT_MAX_PIXELS = 4_194_304
VISION_TOKENS = ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")


@dataclass
class EncodedPrompt:
    """A prompt rendered and tokenised for the policy.

    text: the chat-templated prompt (what a rollout engine receives, with ``images`` as multi-modal data).
    images: the images after resizing, exactly as the model sees them.
    input_ids: prompt token ids, image placeholders expanded to one ``<|image_pad|>`` per merged patch.
    pixel_values / image_grid_thw: vision inputs (None for text-only prompts).
    image_keys: a content hash per resized image: the same picture in two prompts has the same key, so a forward
        runs the vision tower on it once (``collate(image_ids=...)``).
    """

    prompt: Prompt
    text: str
    images: list[Image.Image]
    input_ids: list[int]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    image_keys: list[str] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return 0 if self.image_grid_thw is None else int(self.image_grid_thw.shape[0])

    def for_training(self) -> EncodedPrompt:
        """What another rank needs to train on this prompt: the pixels go along; the PIL images (the engine's) do
        not."""
        return replace(self, images=[], prompt=replace(self.prompt, images=[]))

    @property
    def n_image_tokens(self) -> int:
        return 0 if self.image_grid_thw is None else int(self.image_grid_thw.prod(-1).sum()) // 4


@functools.lru_cache(maxsize=4)
def load_processor(path: str | Path = DEFAULT_PROCESSOR_DIR):
    """AutoProcessor (VLM) or AutoTokenizer (text LM) from a local folder or a hub name, cached per path."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    p = str(path)
    local = Path(p)
    if local.is_dir():
        # transformers 5 writes processor_config.json; older exports and hub folders preprocessor_config.json
        vision = any((local / f).exists() for f in ("preprocessor_config.json", "processor_config.json"))
        return AutoProcessor.from_pretrained(p) if vision else AutoTokenizer.from_pretrained(p)
    try:  # hub name: a VLM has a vision_config
        cfg = AutoConfig.from_pretrained(p)
        return AutoProcessor.from_pretrained(p) if hasattr(cfg, "vision_config") else AutoTokenizer.from_pretrained(p)
    except OSError as e:
        raise DataError(f"cannot load a processor/tokenizer from {p!r}: {e}") from None


def resize_image(image: Image.Image, min_pixels: int, max_pixels: int, patch_size: int = 14) -> Image.Image:
    """Resize to the vision grid (sides a multiple of 2 x ``patch_size``: 28 for Qwen2/2.5-VL, 32 for Qwen3-VL;
    pixel count within [min_pixels, max_pixels])."""
    try:
        from qwen_vl_utils import fetch_image
    except ImportError:  # GPU machines without qwen-vl-utils: the same rule from transformers
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        h, w = smart_resize(image.height, image.width, factor=2 * patch_size, min_pixels=min_pixels,
                            max_pixels=max_pixels)
        return image.convert("RGB").resize((w, h), Image.BICUBIC)
    return fetch_image({"image": image.convert("RGB"), "min_pixels": min_pixels, "max_pixels": max_pixels},
                       image_patch_size=patch_size)


def _tokenizer(processor) -> Any:
    return getattr(processor, "tokenizer", processor)


def encode_prompt(
    prompt: Prompt,
    processor,
    *,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> EncodedPrompt:
    """Render, resize and tokenise one prompt; raises DataError on any image/token inconsistency."""
    n_placeholders = sum(
        1 for m in prompt.messages if isinstance(m["content"], list) for c in m["content"] if c.get("type") == "image"
    )
    if n_placeholders != len(prompt.images):
        raise DataError(f"prompt {prompt.id}: {n_placeholders} image placeholders but {len(prompt.images)} images")
    for m in prompt.messages:
        texts = [m["content"]] if isinstance(m["content"], str) else [c.get("text", "") for c in m["content"]]
        for t in texts:
            for tok in VISION_TOKENS:
                if tok in t:
                    raise DataError(f"prompt {prompt.id}: text contains the special token {tok}; remove it from the data")
    if prompt.images and not hasattr(processor, "image_processor"):
        raise DataError(f"prompt {prompt.id} has images but the processor is a text tokenizer; use a VLM processor")

    tok = _tokenizer(processor)
    if hasattr(processor, "image_processor"):
        text = processor.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
    else:
        text = tok.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
    if not prompt.images:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return EncodedPrompt(prompt, text, [], list(ids), None, None)

    patch = getattr(processor.image_processor, "patch_size", 14)
    images = [resize_image(im, min_pixels, max_pixels, patch) for im in prompt.images]
    # resized above, once: the processor must not resize again (Qwen3-VL's would upscale to its own 65536-pixel
    # minimum, where vLLM, given min/max pixels, does not)
    out = processor(text=[text], images=images, return_tensors="pt", do_resize=False)
    ids = out["input_ids"][0]
    grid = out["image_grid_thw"]
    merge = getattr(processor.image_processor, "merge_size", 2)
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    expected = [int(g.prod()) // (merge * merge) for g in grid]
    found = _pad_runs(ids.tolist(), pad_id)
    if found != expected or grid.shape[0] != len(images):
        raise DataError(
            f"prompt {prompt.id}: image token counts {found} in the text, but the vision encoder will produce "
            f"{expected} features for {grid.shape[0]} image(s); check that the chat template and the images agree"
        )
    keys = [image_key(im) for im in images]
    return EncodedPrompt(prompt, text, images, ids.tolist(), out["pixel_values"], grid, keys)


def image_key(image: Image.Image) -> str:
    """A content hash of a (resized) image: equal keys mean the vision tower sees the same input."""
    h = hashlib.blake2b(image.tobytes(), digest_size=16)
    h.update(f"{image.mode}{image.size}".encode())
    return h.hexdigest()


def _pad_runs(ids: list[int], pad_id: int) -> list[int]:
    """Lengths of the runs of ``pad_id`` in ``ids``: one run per image, in order."""
    return [len(list(run)) for tok, run in itertools.groupby(ids) if tok == pad_id]


def encode_prompts(
    prompts,
    processor,
    *,
    max_prompt_length: int,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[list[EncodedPrompt], dict[str, float]]:
    """Encode many prompts; drop those longer than ``max_prompt_length`` tokens and log how many were dropped."""
    kept: list[EncodedPrompt] = []
    dropped = 0
    lengths = []
    for p in prompts:
        enc = encode_prompt(p, processor, min_pixels=min_pixels, max_pixels=max_pixels)
        lengths.append(len(enc.input_ids))
        if len(enc.input_ids) > max_prompt_length:
            dropped += 1
            continue
        kept.append(enc)
    if dropped:
        log.warning("dropped %d of %d prompts longer than max_prompt_length=%d tokens (longest: %d)",
                    dropped, len(lengths), max_prompt_length, max(lengths))
    metrics = {
        "data/prompts": float(len(lengths)),
        "data/dropped_overlong": float(dropped),
        "data/prompt_len_mean": sum(lengths) / max(len(lengths), 1),
        "data/prompt_len_max": float(max(lengths, default=0)),
    }
    return kept, metrics
