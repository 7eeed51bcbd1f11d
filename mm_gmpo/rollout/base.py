"""The rollout interface every engine implements: ``generate(prompts, sampling) -> list[Rollout]``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from mm_gmpo.data.processing import EncodedPrompt

IMAGE_PAD_ID = 151655
VIDEO_PAD_ID = 151656  # <|video_pad|>, the same id in every Qwen-VL family


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0 means greedy."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int | None = None
    allowed_token_ids: tuple[int, ...] | None = None  # sample only these tokens (the built-in task's answers)
    ignore_eos: bool = False  # always generate max_tokens (throughput benchmarks only)


@dataclass
class Rollout:
    """One sampled response.

    logprobs: the sampler's log-probability of each response token (after temperature / top-p), for the
        train/inference mismatch metrics; None if the engine cannot report them.
    finish_reason: 'stop' (end-of-sequence token) or 'length' (hit max_tokens).
    """

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: str
    meta: dict = field(default_factory=dict)


class RolloutEngine(Protocol):
    def generate(self, prompts: list[EncodedPrompt], sampling: SamplingParams) -> list[Rollout]:
        """n samples per prompt, ordered prompt-major: all samples of prompt 0, then prompt 1, ..."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def sleep(self) -> None: ...

    def wake_up(self) -> None: ...
