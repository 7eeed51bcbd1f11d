"""Prompt -> model inputs with the model family's real processor (or a plain tokenizer for text-only models).

Images are resized once, here, with qwen-vl-utils' ``fetch_image`` (same rule as Qwen's own pipeline and vLLM's
Qwen-VL processors: sides a multiple of patch size x merge size, 28 for Qwen2/2.5-VL, 32 for Qwen3-VL), and the
processor is told not to resize them again: the resized images are kept on :class:`EncodedPrompt` and are what both
the trainer and the rollout engine use, so train- and inference-time vision tokens cannot disagree.

The count of ``<|image_pad|>`` tokens is checked against ``image_grid_thw`` for every prompt, so the transformers
error "Image features and image tokens do not match" cannot happen later in a training step; a mismatch raises a
DataError naming the prompt.

Video clips (``mm_gmpo.data.videos``: sampled and sized when read) go through the family's video processor as they
are, and the prompt ids of a prompt with clips are written here (:func:`video_placeholder`), in one form whatever
the installed transformers writes: the trainer and the engine get the same ids (the engine the template's
unexpanded ids, ``engine_ids``, which its own expansion must turn into ``input_ids``).
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
from mm_gmpo.data.videos import Clip
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
    videos: list[Clip] = field(default_factory=list)
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    video_keys: list[str] = field(default_factory=list)
    video_seconds: list[float] = field(default_factory=list)  # seconds per temporal patch (second_per_grid_ts)
    engine_ids: list[int] = field(default_factory=list)  # with clips: the ids as the template wrote them (vLLM's)

    @property
    def n_images(self) -> int:
        return 0 if self.image_grid_thw is None else int(self.image_grid_thw.shape[0])

    @property
    def n_videos(self) -> int:
        return 0 if self.video_grid_thw is None else int(self.video_grid_thw.shape[0])

    @property
    def n_video_tokens(self) -> int:
        return 0 if self.video_grid_thw is None else int(self.video_grid_thw.prod(-1).sum()) // 4

    def for_training(self) -> EncodedPrompt:
        """What another rank needs to train on this prompt: the pixels go along; the PIL images and clips (the
        engine's) do not."""
        return replace(self, images=[], videos=[], prompt=replace(self.prompt, images=[], videos=[]))

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
    if prompt.videos and not hasattr(processor, "video_processor"):
        raise DataError(f"prompt {prompt.id} has video clips but the processor reads no video; use a Qwen-VL "
                        "processor")
    n_clips = sum(1 for m in prompt.messages if isinstance(m["content"], list) for c in m["content"]
                  if c.get("type") == "video")
    if n_clips != len(prompt.videos):
        raise DataError(f"prompt {prompt.id}: {n_clips} video placeholders but {len(prompt.videos)} clips")

    tok = _tokenizer(processor)
    if hasattr(processor, "image_processor"):
        text = processor.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
    else:
        text = tok.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
    if prompt.videos:
        return _encode_with_clips(prompt, processor, text, min_pixels, max_pixels)
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


VIDEO_WRAPPER = "<|vision_start|><|video_pad|><|vision_end|>"  # what the chat templates write for a clip


def video_placeholder(processor, clip: Clip, grid: torch.Tensor) -> str:
    """The prompt text that stands for one clip: Qwen2-VL and Qwen2.5-VL, one ``<|video_pad|>`` per merged patch
    inside the template's vision_start/end pair; Qwen3-VL, per temporal patch ``<t seconds>`` and that patch's
    pads in their own vision_start/end pair, replacing the template's pair (the form of Qwen3-VL's released
    processor, transformers 4.57, and of vLLM; transformers 5.x keeps the outer pair as well)."""
    merge = getattr(processor.video_processor, "merge_size", 2)
    per_frame = int(grid[1:].prod()) // (merge * merge)
    if timestamped(processor):
        temporal = getattr(processor.video_processor, "temporal_patch_size", 2)
        times = clip.timestamps(temporal)[:int(grid[0])]
        return "".join(f"<{t:.1f} seconds><|vision_start|>{'<|video_pad|>' * per_frame}<|vision_end|>" for t in times)
    return f"<|vision_start|>{'<|video_pad|>' * (per_frame * int(grid[0]))}<|vision_end|>"


def timestamped(processor) -> bool:
    """Whether the family writes a clip as timestamped one-patch groups (Qwen3-VL) rather than one run of pads."""
    return type(processor.video_processor).__name__.startswith("Qwen3VL")


def encode_clip(processor, clip: Clip) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values_videos, video_grid_thw) of one clip: the family's video processor on the frames as they are
    (sampled and sized when the clip was read: no resampling, no resize)."""
    vp = processor.video_processor
    # transformers 5.17-5.21 warn that their resize skips qwen-vl-utils' per-frame cap: frames here are not resized
    accepted = getattr(getattr(vp, "valid_kwargs", None), "__annotations__", {})
    kwargs = {"cap_pixels_per_frame": True} if "cap_pixels_per_frame" in accepted else {}
    out = vp(videos=[clip.frames], do_resize=False, do_sample_frames=False, return_tensors="pt", **kwargs)
    return out["pixel_values_videos"], out["video_grid_thw"]


def _fill(text: str, marker: str, replacements: list[str]) -> str:
    """``text`` with its k-th ``marker`` replaced by ``replacements[k]`` (their count was checked)."""
    parts = text.split(marker)
    return parts[0] + "".join(r + part for r, part in zip(replacements, parts[1:], strict=True))


def _encode_with_clips(prompt: Prompt, processor, text: str, min_pixels: int, max_pixels: int) -> EncodedPrompt:
    """A prompt with clips (and maybe pictures): the vision processors give the pixels and grids, and the prompt
    ids are written here, one form for every installed transformers version (:func:`video_placeholder`); the
    engine is given the same ids."""
    tok = _tokenizer(processor)
    vp = processor.video_processor
    if text.count(VIDEO_WRAPPER) != len(prompt.videos):
        raise DataError(f"prompt {prompt.id}: the chat template wrote {text.count(VIDEO_WRAPPER)} clip placeholders "
                        f"for {len(prompt.videos)} clips; use the model family's own chat template")
    pixels, grids = zip(*(encode_clip(processor, c) for c in prompt.videos), strict=True)
    video_grid = torch.cat(grids)
    engine_ids = list(tok(text, add_special_tokens=False)["input_ids"])
    text = _fill(text, VIDEO_WRAPPER, [video_placeholder(processor, c, g)
                                       for c, g in zip(prompt.videos, video_grid, strict=True)])
    images, pv, grid_img, keys = [], None, None, []
    merge = getattr(vp, "merge_size", 2)
    if prompt.images:
        ip = processor.image_processor
        images = [resize_image(im, min_pixels, max_pixels, getattr(ip, "patch_size", 14)) for im in prompt.images]
        out = ip(images=images, do_resize=False, return_tensors="pt")
        pv, grid_img = out["pixel_values"], out["image_grid_thw"]
        if text.count("<|image_pad|>") != len(images):
            raise DataError(f"prompt {prompt.id}: the chat template wrote {text.count('<|image_pad|>')} image "
                            f"placeholders for {len(images)} images")
        text = _fill(text, "<|image_pad|>", ["<|image_pad|>" * (int(g.prod()) // (merge * merge)) for g in grid_img])
        keys = [image_key(im) for im in images]
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    per_frame = timestamped(processor)  # Qwen3-VL: a run of pads per temporal patch
    want_video = [n for g in video_grid for n in ([int(g[1:].prod()) // merge ** 2] * int(g[0]) if per_frame
                                                  else [int(g.prod()) // merge ** 2])]
    want_image = [] if grid_img is None else [int(g.prod()) // merge ** 2 for g in grid_img]
    for kind, pad, want in (("image", "<|image_pad|>", want_image), ("video", "<|video_pad|>", want_video)):
        found = _pad_runs(ids, tok.convert_tokens_to_ids(pad))
        if found != want:
            raise DataError(f"prompt {prompt.id}: {kind} token runs {found} in the text, but the vision encoder will "
                            f"produce {want} features; check that the chat template and the {kind}s agree")
    temporal = getattr(vp, "temporal_patch_size", 2)
    return EncodedPrompt(prompt, text, images, ids, pv, grid_img, keys, list(prompt.videos), torch.cat(pixels),
                         video_grid, [c.key for c in prompt.videos], [temporal / c.sample_fps for c in prompt.videos],
                         engine_ids)


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
