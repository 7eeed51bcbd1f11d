"""Datasets, prompt templates and Qwen-VL processing. Every loader yields the same typed :class:`Prompt`."""

from mm_gmpo.data.geometry3k import REPO_GEOMETRY3K, geometry3k_prompts, load_geometry3k
from mm_gmpo.data.prompts import DataError, Prompt, render_question
from mm_gmpo.data.text_math import NAMED as TEXT_MATH_DATASETS
from mm_gmpo.data.text_math import load_text_math, text_math_prompts

__all__ = [
    "REPO_GEOMETRY3K",
    "TEXT_MATH_DATASETS",
    "DataError",
    "Prompt",
    "geometry3k_prompts",
    "load_geometry3k",
    "load_text_math",
    "render_question",
    "text_math_prompts",
]
