"""Text-math datasets (MATH, MATH500, GSM8K, AIME, ...) from jsonl/parquet files or hub names, as :class:`Prompt`.

Each row needs ``problem`` (or ``question``) and ``answer`` or ``solution`` (a solution's last ``\\boxed{}`` is the
answer; GSM8K's ``#### 18`` works too). Optional ``level`` (MATH: int or 'Level 3'), ``subject``/``type``, ``id``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from mm_gmpo.data.prompts import DataError, OnBadSample, Prompt, SkipReport, build_messages, render_question

REPO_MATH = Path(__file__).resolve().parents[2] / "data" / "math"
# names that resolve to the files committed under data/math/
NAMED = {
    "math500": "math500_test.jsonl",
    "gsm8k": "gsm8k_test.jsonl",
    "aime2024": "aime_2024.jsonl",
    "aime2025": "aime_2025.jsonl",
}


def _level(value) -> int | None:
    if value is None:
        return None
    m = re.search(r"\d+", str(value))
    return int(m.group(0)) if m else None


def load_text_math(
    source: str | Path,
    *,
    split: str = "train",
    levels: list[int] | None = None,
    on_bad_sample: OnBadSample = "error",
):
    """A text-math dataset as ``datasets.Dataset`` with columns id, problem, answer, level, subject.

    Args:
        source: a name from NAMED ('math500', 'gsm8k', 'aime2024', 'aime2025'), a .jsonl/.json/.parquet file,
            or a hub dataset name (needs network access).
        split: split to take from a hub dataset.
        levels: keep only these MATH levels (e.g. [3, 4, 5] for the paper's MATH level 3-5 setting).
        on_bad_sample: 'error' raises naming the file, row and field; 'skip' drops, counts and warns.
    """
    import datasets

    name = str(source)
    path = REPO_MATH / NAMED[name] if name in NAMED else Path(source)
    if path.suffix in (".jsonl", ".json"):
        if not path.exists():
            raise DataError(f"{path}: file not found")
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    elif path.suffix == ".parquet":
        if not path.exists():
            raise DataError(f"{path}: file not found")
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    elif path.exists():
        raise DataError(f"{path}: unsupported file type; use .jsonl, .json or .parquet")
    else:
        ds = datasets.load_dataset(name, split=split)

    cols = set(ds.column_names)
    problem_col = "problem" if "problem" in cols else "question" if "question" in cols else None
    if problem_col is None:
        raise DataError(f"{path}: no 'problem' (or 'question') field; text-math rows need problem + answer/solution")
    if "answer" not in cols and "solution" not in cols:
        raise DataError(f"{path}: no 'answer' or 'solution' field; text-math rows need one of them")

    report = SkipReport()
    rows = []
    seen_levels: set = set()
    for i, row in enumerate(ds):
        where = f"{path} row {i}"
        problem = row.get(problem_col)
        answer = row.get("answer") or row.get("solution")
        if not problem or not str(problem).strip():
            err = f"{where}: field '{problem_col}' is empty"
        elif answer is None or not str(answer).strip():
            err = f"{where}: fields 'answer'/'solution' are empty"
        else:
            err = None
        if err:
            if on_bad_sample == "error":
                raise DataError(err)
            report.add(where, err)
            continue
        level = _level(row.get("level"))
        seen_levels.add(level)
        if levels is not None and level not in levels:
            continue
        rows.append({
            "id": str(row.get("unique_id") or row.get("id") or i),
            "problem": str(problem),
            "answer": str(answer),
            "level": level if level is not None else -1,
            "subject": str(row.get("subject") or row.get("type") or ""),
        })
    report.warn(str(path))
    if not rows and levels is not None and seen_levels:
        have = sorted(x for x in seen_levels if x is not None)
        raise DataError(f"{path}: the level filter (data.levels={list(levels)}) kept none of its {len(ds)} rows: "
                        + (f"its levels are {have}" if have else "it has no 'level' field (MATH has one; GSM8K and "
                           "AIME do not)") + "; set data.levels=[] to keep every row")
    if not rows:
        raise DataError(f"{path}: no usable samples (empty file, or every row was skipped)")
    return datasets.Dataset.from_list(rows)


def text_math_prompts(ds, *, template: str = "qwen_math", dataset_name: str = "math") -> Iterator[Prompt]:
    """Typed text-only prompts (no images) from :func:`load_text_math` output."""
    for row in ds:
        yield Prompt(
            id=f"{dataset_name}/{row['id']}",
            task="math",
            messages=build_messages(render_question(template, row["problem"]), 0, template),
            images=[],
            ground_truth=row["answer"],
            metadata={"level": row["level"], "subject": row["subject"]},
        )
