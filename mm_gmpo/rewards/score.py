"""The reward contract: ``score(response, ground_truth, task=..., choices=...) -> RewardScore``.

``overall = (1 - format_weight) * accuracy + format_weight * format``; every value in [0, 1]; never raises.
Malformed, truncated, empty or adversarial responses score 0 accuracy.

Tasks
    ``math``        MATH / GSM8K / AIME: ground truth is a plain answer or a solution containing ``\\boxed{}``.
    ``geometry3k``  ground truth is the answer text (HF ``hiyouga/geometry3k``) or a choice letter plus ``choices``
                    (Inter-GPS layout; ``choice_values`` = its ``precise_value``). A response is correct when it
                    names the right letter, the right choice text, or a number within 1% (relative) of the right
                    choice's value that is closer to it than to any other choice. Naming a wrong choice scores 0.
    ``exact``       the response's first word equals the ground truth, case-insensitively (the built-in
                    synthetic task; a boxed answer is also accepted).
"""

from __future__ import annotations

import re
from typing import TypedDict

from mm_gmpo.rewards.extract import (
    LETTERS,
    extract_answer,
    extract_boxed,
    extract_choice_letter,
    has_think_then_boxed,
    letter_of,
)
from mm_gmpo.rewards.math_equiv import (
    _UNITS,
    DeadlineExceeded,
    deadline,
    math_equal,
    normalize,
    numeric_value,
    warm_up,
)

TASKS = ("math", "geometry3k", "exact")
DEFAULT_DEADLINE_S = 1.5
GEO_REL_TOL = 0.01


class RewardScore(TypedDict):
    overall: float
    accuracy: float
    format: float


def _gold_from_solution(ground_truth: str) -> str:
    boxed = extract_boxed(ground_truth) if "\\boxed" in ground_truth or "\\fbox" in ground_truth else None
    if boxed is not None:
        return boxed
    gt = ground_truth.strip()
    if "####" in gt:  # raw GSM8K solution
        gt = gt.rsplit("####", 1)[1].strip()
    return gt


def _format_ok(response: str, format_pattern: str | None) -> bool:
    if format_pattern is None:
        return has_think_then_boxed(response)
    return re.fullmatch(format_pattern, response.strip(), re.DOTALL) is not None


def _math_accuracy(response: str, ground_truth: str) -> bool:
    pred = extract_answer(response)
    return pred is not None and math_equal(pred, _gold_from_solution(ground_truth))


_RELATION = re.compile(r"\\(?:cong|sim|parallel|perp|neq?|leq?|geq?|ne|le|ge)(?![A-Za-z])|[=<>]")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"(?<![A-Za-z])[A-Za-z]{2,}(?![A-Za-z])")
_ASSIGNMENT = re.compile(r"[^=<>]*?=([^=<>]+)")


def is_statement(answer: str) -> bool:
    """A non-numeric statement ("\\angle 1 \\cong \\angle 3", "x < 60", "A D and B E"): a relation, or words.

    math-verify reduces such text to whatever number or expression it can find in it, so two different statements
    that mention the same number compare equal; statements are therefore compared as text.
    """
    text = _UNITS.sub("", answer.strip().rstrip("."))  # "12 cm", "60 degrees" are numbers with units
    return bool(_RELATION.search(text) or _WORD.search(_LATEX_COMMAND.sub(" ", text)))


def _geo_equal(pred: str, gold: str) -> bool:
    """Answer equality for geometry: a statement gold by its normalised text; otherwise math-verify, where a
    predicted statement counts only as a plain assignment ("x = 60", "AB = 5\\sqrt{2}": its right-hand side)."""
    if is_statement(gold):
        p = normalize(pred)
        return bool(p) and p == normalize(gold)
    if is_statement(pred):
        m = _ASSIGNMENT.fullmatch(pred.strip())
        if m is None or is_statement(m.group(1)):
            return False
        pred = m.group(1)
    return math_equal(pred, gold)


def _geometry_accuracy(
    response: str, ground_truth: str, choices: list[str] | None, choice_values: list[float | str] | None
) -> bool:
    pred = extract_answer(response)
    if not choices:
        return pred is not None and _geo_equal(pred, _gold_from_solution(ground_truth))
    n = len(choices)
    gt = ground_truth.strip()
    if len(gt) == 1 and gt in LETTERS[:n]:
        gold_idx = LETTERS.index(gt)
    else:  # the gold text names its choice: by text first; by value only when exactly one choice has it
        gt_norm = normalize(gt)
        matches = [i for i, c in enumerate(choices) if normalize(c) == gt_norm]
        if not matches:
            matches = [i for i, c in enumerate(choices) if _geo_equal(gt, c)]
            if len({normalize(choices[i]) for i in matches}) != 1:  # none, or ambiguous: grade as free-form
                return pred is not None and _geo_equal(pred, gt)
        gold_idx = matches[0]

    # choices textually identical to the gold one (Inter-GPS has a few duplicated choices) count as gold
    gold_norm = normalize(choices[gold_idx])
    gold_set = {i for i, c in enumerate(choices) if normalize(c) == gold_norm}

    if pred is None:  # free-text letter only: "the answer is (B)" / bare final letter
        letter = extract_choice_letter(response, n)
        return letter is not None and LETTERS.index(letter) in gold_set
    letter = letter_of(pred, n)
    if letter is not None:
        return LETTERS.index(letter) in gold_set
    # a choice named by its text: exact (normalised) text first, math-verify equivalence otherwise
    pred_norm = normalize(pred)
    named = {i for i, c in enumerate(choices) if normalize(c) == pred_norm}
    if not named:
        named = {i for i, c in enumerate(choices) if _geo_equal(pred, c)}
    if named:
        return named <= gold_set
    value = numeric_value(pred)
    if value is None:
        return False
    if choice_values and len(choice_values) == n:  # Inter-GPS precise_value: numbers, or text for text choices
        values = [float(v) if isinstance(v, int | float) else numeric_value(str(v)) for v in choice_values]
    else:
        values = [numeric_value(c) for c in choices]
    if values[gold_idx] is None:
        return False
    dist = [abs(value - v) if v is not None else float("inf") for v in values]
    nearest = {i for i in range(n) if dist[i] == min(dist)}
    return nearest <= gold_set and dist[gold_idx] <= GEO_REL_TOL * abs(values[gold_idx])


def _exact_accuracy(response: str, ground_truth: str) -> bool:
    boxed = extract_answer(response)
    text = boxed if boxed is not None else response
    words = re.findall(r"[A-Za-z0-9]+", text[:256])
    return bool(words) and words[0].lower() == ground_truth.strip().lower()


def score(
    response: str,
    ground_truth: str,
    *,
    task: str,
    choices: list[str] | None = None,
    choice_values: list[float | str] | None = None,
    format_weight: float = 0.1,
    format_pattern: str | None = None,
    timeout_s: float | None = DEFAULT_DEADLINE_S,
) -> RewardScore:
    """Score one response. Never raises; anything that goes wrong (or takes longer than timeout_s) scores 0.

    Args:
        response: the model's full response text.
        ground_truth: answer text, solution with ``\\boxed{}``, or (geometry3k) a choice letter.
        task: 'math' or 'geometry3k'.
        choices: multiple-choice texts in letter order (geometry3k).
        choice_values: numeric values of the choices (Inter-GPS ``precise_value``); computed if absent.
        format_weight: w in ``overall = (1 - w) * accuracy + w * format`` (EasyR1: 0.1; paper text setting: 0).
        format_pattern: a regex the whole (stripped) response must fullmatch (DOTALL); default:
            ``<think>...</think>`` then a final ``\\boxed{}``, checked in linear time.
        timeout_s: per-item deadline for math-verify work (main thread only).
    """
    if task not in TASKS:
        raise ValueError(f"unknown reward task {task!r}; choose one of {TASKS}")  # a caller bug, not model output
    if not isinstance(response, str) or not isinstance(ground_truth, str):
        return RewardScore(overall=0.0, accuracy=0.0, format=0.0)
    accuracy = fmt = 0.0
    warm_up()  # first-call imports (sympy, math-verify's grammar) must not eat the item's deadline
    try:
        with deadline(timeout_s):
            if format_weight:
                fmt = float(_format_ok(response, format_pattern))
            if task == "math":
                ok = _math_accuracy(response, ground_truth)
            elif task == "exact":
                ok = _exact_accuracy(response, ground_truth)
            else:
                ok = _geometry_accuracy(response, ground_truth, choices, choice_values)
            accuracy = float(ok)
    except (DeadlineExceeded, Exception, RecursionError):
        accuracy = 0.0
    overall = (1.0 - format_weight) * accuracy + format_weight * fmt
    return RewardScore(overall=overall, accuracy=accuracy, format=fmt)
