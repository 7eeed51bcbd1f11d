"""A backend that answers from the ground truth: checks an evaluation or reward pipeline end to end.

``mode='correct'`` must score 100%, ``mode='wrong'`` 0% (a wrong choice, or an impossible number);
``mode='garbage'`` returns malformed text (unbalanced braces, nothing boxed) that must score 0 without crashing.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mm_gmpo.data.processing import EncodedPrompt
from mm_gmpo.rollout.base import Rollout, SamplingParams


def _answer(enc: EncodedPrompt, mode: str) -> str:
    p = enc.prompt
    if mode == "garbage":
        return "\\boxed{" + "{" * 50 + "\x00 ... <think>"
    if mode == "correct":
        return f"<think>oracle</think> \\boxed{{{p.ground_truth}}}"
    choices = p.choices or p.metadata.get("all_choices")
    if choices:
        gold = p.ground_truth if p.choices is None else p.choices["ABCDEFGH".index(p.ground_truth)]
        wrong = next((c for c in choices if c.strip() != gold.strip()), "none")
        return f"<think>oracle</think> \\boxed{{{wrong}}}"
    return "<think>oracle</think> \\boxed{-123456789.5}"


class OracleEngine:
    def __init__(self, mode: str = "correct"):
        if mode not in ("correct", "wrong", "garbage"):
            raise ValueError(f"oracle mode must be correct, wrong or garbage, got {mode!r}")
        self.mode = mode

    def generate(self, prompts: list[EncodedPrompt], sampling: SamplingParams) -> list[Rollout]:
        out = []
        for i, enc in enumerate(prompts):
            text = _answer(enc, self.mode)
            for s in range(sampling.n):
                out.append(Rollout(i, s, list(enc.input_ids), [], text, None, "stop"))
        return out

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        pass

    def sleep(self) -> None:
        pass

    def wake_up(self) -> None:
        pass
