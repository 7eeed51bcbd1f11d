"""A run's inputs, read and checked before anything is written: the processor, the train and validation prompts,
the user's reward function (probed once), restricted answer tokens, and the prompt sampler (the data position)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from mm_gmpo.config import Config, ConfigError, validate
from mm_gmpo.data.images import ImageFit, ImageStore
from mm_gmpo.data.processing import EncodedPrompt, encode_prompts, load_processor
from mm_gmpo.data.prompts import DataError, Prompt, limit_images
from mm_gmpo.data.synthetic import COLORS, DIGITS, FLASH_COUNTS, single_token_ids
from mm_gmpo.data.videos import ClipStore, VideoFit
from mm_gmpo.models import check_model_source, processor_source
from mm_gmpo.rewards.custom import RewardFunction, probe, resolve_spec
from mm_gmpo.rollout.layout import RolloutLayout, rollout_layout


class PromptSampler:
    """Deterministic epoch-wise shuffling over a prompt list; its state is the data position in checkpoints."""

    def __init__(self, n_items: int, seed: int):
        self.n, self.seed, self.epoch, self.index = n_items, seed, 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffle()
            take = min(k - len(out), self.n - self.index)
            out += self._order[self.index:self.index + take]
            self.index += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n", self.n) != self.n:
            raise ConfigError(f"the checkpoint's dataset had {state['n']} prompts, this one has {self.n}: "
                              "resume with the same data, or start a new output_dir")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._shuffle()


def video_fit(cfg: Config, patch_size: int = 14) -> VideoFit:
    """How the run samples and sizes clips (data.video_*); a clip's frames share the prompt's token budget
    (data.max_prompt_length, 90% of it as qwen-vl-utils keeps room for the text)."""
    d = cfg.data
    return VideoFit(d.video_fps, d.video_max_frames, d.video_min_pixels, d.video_max_pixels, patch_size,
                    total_pixels=int(0.9 * d.max_prompt_length * (2 * patch_size) ** 2))


def load_prompts(cfg: Config, split: str, images: ImageStore | None = None, clips: ClipStore | None = None,
                 ) -> list[Prompt]:
    """Train or validation prompts for the configured dataset; prompts with more than data.max_images images
    (data.max_videos clips) are dropped with a counted warning. File images go through ``images`` (one per distinct
    file, fitted), clips through ``clips``."""
    d = cfg.data
    images = images if images is not None else ImageStore(ImageFit(d.min_pixels, d.max_pixels))
    clips = clips if clips is not None else ClipStore(video_fit(cfg))
    source = d.train_source if split == "train" else d.val_source
    which = d.train_split if split == "train" else d.val_split
    if d.dataset == "files":
        from mm_gmpo.data.files import Columns, load_file_prompts

        source = d.train_files if split == "train" else d.val_files
        prompts = load_file_prompts(source, columns=Columns(d.prompt_key, d.answer_key, d.image_key, d.video_key),
                                    image_dir=d.image_dir or None, template=d.template,
                                    system_prompt=d.system_prompt or None, task=d.task, on_bad_sample=d.on_bad_sample,
                                    default_split="train" if split == "train" else "test", images=images,
                                    clips=clips)
    elif d.dataset == "synthetic":
        from mm_gmpo.data.synthetic import synthetic_prompts

        prompts = synthetic_prompts(512 if split == "train" else 64, seed=cfg.trainer.seed, split=split)
    elif d.dataset == "flashes":
        from mm_gmpo.data.synthetic import flash_prompts

        prompts = flash_prompts(512 if split == "train" else 64, clips.fit, seed=cfg.trainer.seed, split=split)
    elif d.dataset == "arithmetic":
        from mm_gmpo.data.synthetic import arithmetic_prompts

        prompts = arithmetic_prompts(512 if split == "train" else 64, seed=cfg.trainer.seed, split=split,
                                     template=d.template)
    elif d.dataset == "geometry3k":
        from mm_gmpo.data.geometry3k import geometry3k_prompts, load_geometry3k

        ds = load_geometry3k(source, which, on_bad_sample=d.on_bad_sample) if source else load_geometry3k(split=which)
        prompts = list(geometry3k_prompts(ds, template=d.template, show_choices=d.show_choices, images=images))
    else:
        from mm_gmpo.data.text_math import load_text_math, text_math_prompts

        ds = load_text_math(source or "math500", split=which, levels=d.levels or None, on_bad_sample=d.on_bad_sample)
        prompts = list(text_math_prompts(ds, template=d.template))
    return limit_images(prompts, d.max_images, source or f"{d.dataset} [{split}]", d.max_videos)


def reward_function(cfg: Config, probe_ground_truth: str) -> RewardFunction | None:
    """The configured user reward function, loaded and called once on one sample, or None (built-in verifiers).
    Every mistake in it stops the run here, before the first rollout, with a message naming file and function."""
    alg = cfg.algorithm
    if not alg.reward_function:
        return None
    rf = RewardFunction(resolve_spec(alg.reward_function), dict(alg.reward_kwargs), alg.reward_type,
                        alg.reward_timeout_s)
    probe(rf, probe_ground_truth)
    return rf


@dataclass
class Inputs:
    """What the run reads before anything is written: processor, prompts, reward function, restricted tokens."""

    processor: object
    tokenizer: object
    train_prompts: list[Prompt]
    rf: RewardFunction | None
    val_encoded: list[EncodedPrompt]  # this engine group's share of the validation prompts
    allowed: tuple[int, ...] | None  # restricted sampling: the built-in tasks' answers, or rollout.allowed_tokens

    @property
    def has_clips(self) -> bool:
        """Whether any train or validation prompt shows a video clip."""
        return any(p.videos for p in self.train_prompts) or any(e.videos for e in self.val_encoded)


def prepare_inputs(cfg: Config, layout: RolloutLayout) -> Inputs:
    """Load and check every input (model or processor source, train and validation data, the reward function's
    probe, restricted tokens); raises ConfigError / DataError naming the key, file or filter."""
    key, source = ("model.processor", cfg.model.processor) if cfg.model.processor else ("model.path", cfg.model.path)
    check_model_source(source, key)
    try:
        processor = load_processor(processor_source(source))
    except DataError as e:
        why = ("the folder has no processor or tokenizer that loads" if Path(source).expanduser().exists() else
               "the folder does not exist and the hub could not give it")
        raise ConfigError(f"{key}: no model folder or hub id {source!r} that loads: {why} ({e})") from None
    tokenizer = getattr(processor, "tokenizer", processor)
    # images are kept at the size the processor will use, one per distinct file: memory bounded by the pictures
    patch = getattr(getattr(processor, "image_processor", None), "patch_size", 14)
    images = ImageStore(ImageFit(cfg.data.min_pixels, cfg.data.max_pixels, patch))
    clips = ClipStore(video_fit(cfg, patch))
    train_prompts = load_prompts(cfg, "train", images, clips)
    rf = reward_function(cfg, train_prompts[0].ground_truth)  # a user reward: loaded and probed before any model
    val_encoded: list[EncodedPrompt] = []
    if cfg.trainer.eval_every or cfg.trainer.val_before_train:
        val = load_prompts(cfg, "val", images, clips)[layout.dp_rank::layout.dp_size]  # each engine group answers its share
        val_encoded, _ = encode_prompts(val, processor, max_prompt_length=cfg.data.max_prompt_length,
                                        min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    if images.count and os.environ.get("RANK", "0") == "0":
        print(f"data: {len(train_prompts)} train prompts; images held: {images.summary()} (at the processor's size)")
    if clips.count and os.environ.get("RANK", "0") == "0":
        print(f"data: {clips.count} clips held, {clips.nbytes / 2**20:.1f} MiB (sampled, at the processor's size)")
    allowed = None
    builtin = {"synthetic": list(COLORS), "arithmetic": list(DIGITS), "flashes": list(FLASH_COUNTS)}
    builtin_words = builtin.get(cfg.data.dataset, [])
    words = list(cfg.rollout.allowed_tokens) or builtin_words
    if words:
        try:
            allowed = tuple(single_token_ids(tokenizer, words))
        except ValueError as e:
            raise ConfigError(f"rollout.allowed_tokens: {e}") from None
    return Inputs(processor, tokenizer, train_prompts, rf, val_encoded, allowed)


def check_inputs(cfg: Config) -> None:
    """``train_mm.py --check``: every check of a run's settings and inputs, in this process, writing nothing."""
    validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")),
             local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))))
    prepare_inputs(cfg, rollout_layout(0, 1))
