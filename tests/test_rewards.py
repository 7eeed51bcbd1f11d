"""Reward table: >= 80 (response, ground truth, expected accuracy) cases, real Geometry3K answers, adversarial inputs."""

import json
import time
from pathlib import Path

import pytest

from mm_gmpo.rewards import extract_answer, extract_boxed, extract_choice_letter, score, score_batch

GEO = Path(__file__).resolve().parents[1] / "data" / "geometry3k"


def geo(pid: int) -> dict:
    split = "test" if pid >= 2401 else "val"
    return json.loads((GEO / split / str(pid) / "data.json").read_text())


MATH_CASES = [
    # (response, ground truth, expected accuracy)
    ("\\boxed{42}", "42", 1),
    ("\\boxed{41}", "42", 0),
    ("The answer is \\boxed{\\frac{1}{2}}.", "\\frac12", 1),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1),
    ("\\boxed{\\dfrac{14}{3}}", "\\frac{14}{3}", 1),
    ("\\boxed{3\\sqrt{13}}", "3\\sqrt{13}", 1),
    ("\\boxed{\\sqrt{117}}", "3\\sqrt{13}", 1),
    ("\\boxed{90^\\circ}", "90^\\circ", 1),
    ("\\boxed{90}", "90^\\circ", 1),
    ("\\boxed{50\\%}", "50\\%", 1),
    ("\\boxed{2\\pi}", "2\\pi", 1),
    ("\\boxed{6.28}", "2\\pi", 0),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1),
    ("\\boxed{(3,\\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1),
    ("\\boxed{(3,\\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 0),
    ("\\boxed{p - q}", "p - q", 1),
    ("\\boxed{q - p}", "p - q", 0),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", 1),
    ("\\boxed{Evelyn}", "\\text{Evelyn}", 1),
    ("\\boxed{12 cm}", "12", 1),
    ("\\boxed{12\\text{ cm}}", "12", 1),
    ("\\boxed{1,000}", "1000", 1),
    ("<answer>7</answer>", "7", 1),
    ("<answer>\\boxed{7}</answer>", "7", 1),
    ("<answer>8</answer>", "7", 0),
    ("no answer here, sorry", "7", 0),
    ("", "7", 0),
    ("\\boxed{}", "7", 0),
    ("First \\boxed{3} ... actually \\boxed{7}", "7", 1),
    ("\\boxed{7} wait, no: \\boxed{3}", "7", 0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", 1),
    ("\\boxed 5", "5", 1),
    ("\\fbox{5}", "5", 1),
    ("\\boxed{[2,5)}", "[2,5)", 1),
    ("\\boxed{(2,5)}", "[2,5)", 0),
    ("\\boxed{x=5}", "5", 1),
    ("\\boxed{070}", "70", 1),
    ("\\boxed{-3}", "3", 0),
    ("\\boxed{nan}", "5", 0),
    ("\\boxed{\\infty}", "5", 0),
    ("So $x = \\boxed{\\frac{3}{56}}$.", "We find ... so the answer is $\\boxed{\\frac{3}{56}}$.", 1),  # MATH solution
    ("\\boxed{18}", "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n#### 18", 1),  # raw GSM8K solution
    ("\\boxed{2220}", "2220", 1),
    ("\\boxed{2,220}", "2220", 1),
]

# Geometry3K free-form answers (HF hiyouga/geometry3k style: answer text, no choices), Inter-GPS spacing
GEO_FREE_CASES = [
    ("\\boxed{2 \\sqrt { 221 }}", "2 \\sqrt { 221 }", 1),
    ("\\boxed{2\\sqrt{221}}", "2 \\sqrt { 221 }", 1),
    ("\\boxed{\\sqrt{884}}", "2 \\sqrt { 221 }", 1),
    ("\\boxed{2\\sqrt{211}}", "2 \\sqrt { 221 }", 0),
    ("\\boxed{\\frac{3}{5}\\pi}", "\\frac { 3 } { 5 } \\pi", 1),
    ("\\boxed{\\frac{3\\pi}{5}}", "\\frac { 3 } { 5 } \\pi", 1),
    ("\\boxed{5 \\sqrt 2}", "5 \\sqrt { 2 }", 1),
    ("\\boxed{5\\sqrt{3}}", "5 \\sqrt { 2 }", 0),
    ("\\boxed{129.9}", "129.9", 1),
    ("\\boxed{60}", "60", 1),
]

# (problem id in the committed Inter-GPS split, response, expected accuracy); ground truth = its answer letter
GEO_CHOICE_CASES = [
    (2401, "<think>area = 1/2 b h</think> \\boxed{B}", 1),  # choices 30 60 120 240, answer B
    (2401, "\\boxed{(B)}", 1),
    (2401, "\\boxed{60}", 1),
    (2401, "\\boxed{A}", 0),
    (2401, "\\boxed{30}", 0),  # a wrong choice
    (2401, "The answer is (B).", 1),
    (2401, "Answer: B", 1),
    (2401, "... so the area is 60, therefore\nB", 1),
    (2401, "A, B, C or D", 0),  # listing every letter is no answer
    (2401, "\\boxed{60.3}", 1),  # within 1% and nearest to B
    (2401, "\\boxed{61}", 0),  # 1.7% off
    (2401, "\\boxed{B. 60}", 1),
    (2401, "\\boxed{60 square units}", 1),
    (2401, "\\boxed{\\text{B}}", 1),
    (2401, "\\boxed{E}", 0),  # not a choice letter
    (2401, "the answer is c", 0),  # lower-case c is not a choice letter claim, and C is wrong anyway
    (2700, "\\boxed{129.9}", 1),  # choices 75 112.5 129.9 225, answer C
    (2700, "\\boxed{75\\sqrt{3}}", 1),  # 129.90...: within 1% of C
    (2700, "\\boxed{130}", 1),
    (2700, "\\boxed{112.5}", 0),
    (2900, "\\boxed{7.5}", 1),  # choices 3.76 7.51 13.84 15.02, answer B
    (2900, "\\boxed{7.6}", 0),  # 1.2% off
    (2409, "\\boxed{21 \\sqrt { 3 }}", 1),  # choices 21, 21 sqrt 2, 21 sqrt 3, 42; answer C
    (2409, "\\boxed{21\\sqrt3}", 1),
    (2409, "\\boxed{36.37}", 1),
    (2409, "\\boxed{21\\sqrt{2}}", 0),
    (2409, "\\boxed{29.7}", 0),
    (2419, "\\boxed{10\\pi}", 1),  # 8pi 10pi 16pi 20pi; answer B
    (2419, "\\boxed{31.4}", 1),
    (2419, "\\boxed{8 \\pi}", 0),
    (2463, "\\boxed{4\\sqrt{2}}", 1),  # answer D
    (2463, "\\boxed{\\sqrt{32}}", 1),
    (2463, "\\boxed{\\frac{\\sqrt{2}}{2}}", 0),
    (2552, "\\boxed{A D and B E}", 1),  # text choices whose text contains letters; answer C
    (2552, "\\boxed{A D and B C}", 0),
    (2552, "\\boxed{AD and BE}", 1),
    (2552, "\\boxed{C}", 1),
    (2552, "\\boxed{B}", 0),
    (2748, "\\boxed{\\angle 3 \\cong \\angle Z}", 1),  # relation choices: exact text beats loose math equality
    (2748, "\\boxed{\\angle 1 \\cong \\angle 3}", 0),
    (2833, "\\boxed{18}", 1),  # choices 9 12 18 18 (C and D identical), answer C
    (2833, "\\boxed{D}", 1),
    (2833, "\\boxed{12}", 0),
]

ADVERSARIAL = [
    "x" * 1_000_000,
    "\\boxed{" + "{" * 1_000_000,
    "\\boxed{" + "\\frac{1}{" * 100 + "2" + "}" * 100 + "}",
    "\\boxed{9^9^9^9}",
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{10^{10^{10}}}",
    "\\boxed{99999999!}",
    "\\boxed{" + "1" * 400 + "}",
    "\\boxed{",
    "}}}}\\boxed}}}{{{",
    "\x00\xff\ufffd" * 1000,
    "<think>" * 100_000 + "</think>" * 100_000,
    "\\boxed{\\sqrt{\\sqrt{\\sqrt{\\sqrt{\\sqrt{\\sqrt{\\sqrt{\\sqrt{2}}}}}}}}}",
    "<answer>" + "(" * 100_000 + "</answer>",
    "The answer is (" * 50_000,
]


@pytest.mark.parametrize(("response", "gt", "expected"), MATH_CASES)
def test_math_table(response, gt, expected):
    s = score(response, gt, task="math", format_weight=0.0)
    assert s["accuracy"] == expected
    assert s["overall"] == expected


@pytest.mark.parametrize(("response", "gt", "expected"), GEO_FREE_CASES)
def test_geometry_free_form_table(response, gt, expected):
    assert score(response, gt, task="geometry3k")["accuracy"] == expected


@pytest.mark.parametrize(("pid", "response", "expected"), GEO_CHOICE_CASES)
def test_geometry_choice_table_on_real_data(pid, response, expected):
    d = geo(pid)
    s = score(response, d["answer"], task="geometry3k", choices=d["choices"], choice_values=d["precise_value"])
    assert s["accuracy"] == expected
    # the same case without precise_value (values computed from the choice texts) agrees
    assert score(response, d["answer"], task="geometry3k", choices=d["choices"])["accuracy"] == expected


@pytest.mark.parametrize(("pid", "response", "expected"), GEO_CHOICE_CASES[:12])
def test_geometry_hf_style_ground_truth_text_with_choices(pid, response, expected):
    d = geo(pid)
    gold_text = d["choices"]["ABCD".index(d["answer"])]
    assert score(response, gold_text, task="geometry3k", choices=d["choices"])["accuracy"] == expected


def test_table_size():
    assert len(MATH_CASES) + len(GEO_FREE_CASES) + len(GEO_CHOICE_CASES) + len(ADVERSARIAL) >= 80


@pytest.mark.parametrize("response", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_scores_zero_fast_and_never_raises(response):
    t0 = time.perf_counter()
    s = score(response, "5", task="math")
    s_geo = score(response, "B", task="geometry3k", choices=["30", "60", "120", "240"])
    per_item = (time.perf_counter() - t0) / 2
    assert s == {"overall": 0.0, "accuracy": 0.0, "format": 0.0}
    assert s_geo["accuracy"] == 0.0
    assert per_item < 2.0  # the contract: a pathological item returns 0 within 2 s


def test_non_string_response_scores_zero():
    assert score(None, "5", task="math")["overall"] == 0.0  # type: ignore[arg-type]


def test_unknown_task_is_a_caller_error():
    with pytest.raises(ValueError, match="unknown reward task"):
        score("\\boxed{1}", "1", task="mcq")


# ---------------------------------------------------------------- format and overall


@pytest.mark.parametrize(
    ("response", "fmt"),
    [
        ("<think>work</think> so \\boxed{1}", 1),
        ("  <think>\nwork\n</think>\n\nThe answer is $\\boxed{1}$.", 1),
        ("\\boxed{1}", 0),
        ("<think>work</think> the answer is 1", 0),
        ("<think>a<think>b</think>\\boxed{1}", 0),
        ("<think>a</think>\\boxed{1}</think>", 0),
        ("preamble <think>a</think>\\boxed{1}", 0),
    ],
)
def test_format_reward(response, fmt):
    assert score(response, "1", task="math")["format"] == fmt


def test_overall_weighting():
    s = score("\\boxed{1}", "1", task="math", format_weight=0.1)
    assert s == pytest.approx({"overall": 0.9, "accuracy": 1.0, "format": 0.0})
    s = score("<think>x</think>\\boxed{2}", "1", task="math", format_weight=0.1)
    assert s == pytest.approx({"overall": 0.1, "accuracy": 0.0, "format": 1.0})
    s = score("<think>x</think>\\boxed{1}", "1", task="math", format_weight=0.5)
    assert s["overall"] == 1.0
    assert score("<think>x</think>\\boxed{1}", "1", task="math", format_weight=0.0)["format"] == 0.0


def test_custom_format_pattern():
    pat = r"<reasoning>.*</reasoning>\s*<answer>.*</answer>"
    assert score("<reasoning>r</reasoning><answer>3</answer>", "3", task="math", format_pattern=pat)["format"] == 1
    assert score("<think>r</think>\\boxed{3}", "3", task="math", format_pattern=pat)["format"] == 0


# ---------------------------------------------------------------- extraction


def test_extract_boxed_nested_and_last():
    assert extract_boxed("\\boxed{\\frac{a}{b}} and \\boxed{\\sqrt{\\frac{1}{2}}}") == "\\sqrt{\\frac{1}{2}}"
    assert extract_boxed("\\boxed{unbalanced and \\boxed{ok}") == "ok"
    assert extract_boxed("no box") is None
    assert extract_answer("<answer> 12 </answer>") == "12"


def test_extract_choice_letter_styles():
    assert extract_choice_letter("so the answer is (C).", 4) == "C"
    assert extract_choice_letter("Final choice: D", 4) == "D"
    assert extract_choice_letter("we get\n(B)", 4) == "B"
    assert extract_choice_letter("The answer is (F)", 4) is None
    assert extract_choice_letter("I like geometry", 4) is None


# ---------------------------------------------------------------- batch


def test_score_batch_matches_score_in_process_and_in_workers():
    cases = MATH_CASES[:20]
    responses = [c[0] for c in cases]
    gts = [c[1] for c in cases]
    single = [score(r, g, task="math") for r, g in zip(responses, gts, strict=True)]
    for workers in (0, 2):
        scores, m = score_batch(responses, gts, task="math", workers=workers)
        assert scores == single
        assert m["reward/accuracy"] == pytest.approx(sum(c[2] for c in cases) / len(cases))


def test_workers_started_up_front_are_the_ones_scoring_uses():
    """The trainer starts the pool before its first step; scoring then finds it warm (same processes)."""
    from mm_gmpo.rewards import batch

    assert batch.start_workers(0) == 0.0
    if batch._POOL is not None:  # a pool an earlier test left: start from none
        batch._POOL.close()
        batch._POOL = None
    took = batch.start_workers(2)
    pool, pids = batch._POOL, [w.process.pid for w in batch._POOL.workers]
    t0 = time.perf_counter()
    scores, _ = score_batch(["\\boxed{1}", "\\boxed{2}"], ["1", "3"], task="math", workers=2)
    assert [s["accuracy"] for s in scores] == [1.0, 0.0] and took > 0
    assert batch._POOL is pool and [w.process.pid for w in batch._POOL.workers] == pids
    assert time.perf_counter() - t0 < took  # no start-up inside the scoring call


def test_score_batch_kills_a_stuck_worker_and_keeps_the_rest():
    """With the in-process deadline off, an unbounded item must be killed by the pool, not hang the run."""
    responses = ["\\boxed{1}", "\\boxed{9^{9^{9^{9}}}}", "\\boxed{2}", "\\boxed{3}"]
    t0 = time.perf_counter()
    scores, m = score_batch(responses, ["1", "5", "2", "4"], task="math", workers=1, timeout_s=None, grace_s=1.0)
    assert [s["accuracy"] for s in scores] == [1.0, 0.0, 1.0, 0.0]
    assert m["reward/killed_for_time"] == 1.0
    assert time.perf_counter() - t0 < 30


def test_score_batch_mixed_tasks_and_length_errors():
    d = geo(2401)
    scores, _ = score_batch(
        ["\\boxed{B}", "\\boxed{4}"], ["B", "4"], task=["geometry3k", "math"], choices=[d["choices"], None], workers=0
    )
    assert [s["accuracy"] for s in scores] == [1.0, 1.0]
    with pytest.raises(ValueError, match="ground truths"):
        score_batch(["a"], [], task="math")


# ---------------------------------------------------------------- grading defects found beside EasyR1's grader


@pytest.mark.parametrize("response, gt, expected", [
    ("\\boxed{\\$18}", "18", 1.0),            # escaped dollar in the answer
    ("\\boxed{18}", "\\$18", 1.0),            # ... and in the ground truth
    ("\\boxed{\\$18.00}", "#### 18", 1.0),    # GSM8K solution, cents
    ("\\boxed{\\$1,250}", "1250", 1.0),
    ("\\boxed{\\$18}", "\\boxed{\\$18}", 1.0),
    ("\\boxed{\\$19}", "\\$18", 0.0),         # still a different amount
    ("\\boxed{$18$}", "18", 1.0),             # plain math delimiters as before
])
def test_escaped_dollar_is_a_currency_sign(response, gt, expected):
    assert score(response, gt, task="math", format_weight=0)["accuracy"] == expected


CONGRUENCES = ["\\angle 1 \\cong \\angle 3", "\\angle 1 \\cong \\angle Z", "\\angle 2 \\cong \\angle X",
               "\\angle 3 \\cong \\angle Z"]  # Inter-GPS test 2748, answer D


@pytest.mark.parametrize("choices", [None, CONGRUENCES], ids=["free-form", "choices"])
@pytest.mark.parametrize("named", range(4))
def test_statement_choices_that_name_the_same_number_are_not_confused(choices, named):
    """math-verify reads both '\\angle 1 \\cong \\angle 3' and '\\angle 3 \\cong \\angle Z' as 3; only the gold
    statement may score, whether the gold is given as text or as its letter."""
    response = f"<think>...</think> \\boxed{{{CONGRUENCES[named]}}}"
    expected = 1.0 if named == 3 else 0.0
    assert score(response, CONGRUENCES[3], task="geometry3k", choices=choices)["accuracy"] == expected
    if choices:
        assert score(response, "D", task="geometry3k", choices=choices)["accuracy"] == expected


@pytest.mark.parametrize("response, gold, expected", [
    ("x < 60", "x < 60", 1.0), ("x<60", "x < 60", 1.0), ("x < 140", "x < 60", 0.0), ("x = 60", "x < 60", 0.0),
    ("A D and B E", "A D and B E", 1.0), ("A D and B C", "A D and B E", 0.0),
    ("angles 2,3, and 4", "angles 2,3, 6, and 7", 0.0),
    ("\\angle 1 \\cong \\angle 3", "3", 0.0),     # a statement is not the number it mentions
    ("x = 60", "60", 1.0), ("m \\angle ABC = 60", "60", 1.0),  # a plain assignment gives its value
    ("60 degrees", "60", 1.0), ("12 cm", "12", 1.0), ("10y^2+5y", "10 y^2 + 5 y", 1.0),
])
def test_geometry_statements_compare_as_text_numbers_by_value(response, gold, expected):
    assert score(f"\\boxed{{{response}}}", gold, task="geometry3k", format_weight=0)["accuracy"] == expected


def test_every_inter_gps_statement_choice_scores_only_itself():
    """All committed problems whose choices are statements: each choice, given as answer text, scores 1 only
    against itself (free-form, as in the HF setting) and only for its own letter (with choices)."""
    from mm_gmpo.data import load_geometry3k
    from mm_gmpo.rewards.score import is_statement

    checked = 0
    for split in ("test", "val"):
        for row in load_geometry3k(split=split):
            choices = list(row["choices"])
            if not any(is_statement(c) for c in choices):
                continue
            for c in choices:
                for j, gold in enumerate(choices):
                    same = c.strip() == gold.strip()
                    r = f"\\boxed{{{c}}}"
                    assert score(r, gold, task="geometry3k", format_weight=0)["accuracy"] == float(same), (c, gold)
                    assert score(r, "ABCD"[j], task="geometry3k", choices=choices, format_weight=0)["accuracy"] == \
                        float(same), (c, gold)
            checked += 1
    assert checked >= 3
