"""Answer verifiers and rewards: ``score`` for one response, ``score_batch`` for many. Never raise on model output."""

from mm_gmpo.rewards.batch import score_batch
from mm_gmpo.rewards.extract import extract_answer, extract_boxed, extract_choice_letter
from mm_gmpo.rewards.math_equiv import math_equal, numeric_value
from mm_gmpo.rewards.score import TASKS, RewardScore, score

__all__ = [
    "TASKS",
    "RewardScore",
    "extract_answer",
    "extract_boxed",
    "extract_choice_letter",
    "math_equal",
    "numeric_value",
    "score",
    "score_batch",
]
