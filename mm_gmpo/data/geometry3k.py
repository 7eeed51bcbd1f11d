"""Geometry3K from either layout, as one ``datasets.Dataset`` schema, then as typed :class:`Prompt` objects.

Layouts
    Inter-GPS   ``<root>/<split>/<id>/data.json`` + ``img_diagram.png`` (the copy committed under data/geometry3k/).
    HF          ``hiyouga/geometry3k``: columns ``images`` (list of images), ``problem`` (with ``<image>``),
                ``answer`` (the answer text); a hub name, or a local folder / parquet file(s) of it.
    unified     the parquet written by ``scripts/prepare_geometry3k.py`` (this module's schema).

Unified schema (one row per problem)
    id, problem, image (datasets Image), choices (list[str], empty if unknown), answer (answer text),
    answer_letter ('' if unknown), choice_values (list[str]: Inter-GPS precise_value as text),
    problem_type_graph (list[str]), problem_type_goal (list[str]), split.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from mm_gmpo.data.images import ImageStore, decode_image, image_file_bytes
from mm_gmpo.data.prompts import DataError, OnBadSample, Prompt, SkipReport, build_messages, render_question

REPO_GEOMETRY3K = Path(__file__).resolve().parents[2] / "data" / "geometry3k"
LETTERS = "ABCDEFGH"
_REQUIRED = ("problem_text", "choices", "answer")


def _features():
    from datasets import Features, Image, List, Value

    return Features(
        id=Value("string"), problem=Value("string"), image=Image(), choices=List(Value("string")),
        answer=Value("string"), answer_letter=Value("string"), choice_values=List(Value("string")),
        problem_type_graph=List(Value("string")), problem_type_goal=List(Value("string")), split=Value("string"),
    )


def _check_image(path: Path) -> bytes:
    if not path.exists():
        raise DataError(f"{path}: image file missing (field 'img_diagram.png'); restore it or use on_bad_sample=skip")
    return image_file_bytes(path, f"{path}: the image (field 'img_diagram.png')")


def _intergps_row(problem_dir: Path, split: str) -> dict[str, Any]:
    meta_path = problem_dir / "data.json"
    if not meta_path.is_file() or meta_path.stat().st_size == 0:  # no FIFO or /proc file: its read could block
        raise DataError(f"{meta_path}: missing, empty or not a regular file; every problem folder needs data.json and "
                        "img_diagram.png")
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{meta_path}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: a JSON {type(meta).__name__}, expected an object with {list(_REQUIRED)}")
    for key in _REQUIRED:
        if key not in meta or meta[key] in (None, "", []):
            raise DataError(f"{meta_path}: field '{key}' is missing or empty")
    if not isinstance(meta["problem_text"], str):
        raise DataError(f"{meta_path}: field 'problem_text' is a {type(meta['problem_text']).__name__}, expected "
                        "text")
    if not isinstance(meta["choices"], list) or not all(isinstance(c, str | int | float) and not isinstance(c, bool)
                                                         for c in meta["choices"]):
        raise DataError(f"{meta_path}: field 'choices' is {meta['choices']!r}, expected a list of answer texts "
                        "such as [\"30\", \"60\", \"120\", \"240\"]")
    if not isinstance(meta["answer"], str):
        raise DataError(f"{meta_path}: field 'answer' is a {type(meta['answer']).__name__}, expected a letter")
    choices = [str(c) for c in meta["choices"]]
    letter = meta["answer"].strip()
    if letter not in LETTERS[: len(choices)]:
        raise DataError(f"{meta_path}: field 'answer' is {letter!r}, expected a letter among {LETTERS[:len(choices)]}")
    image = _check_image(problem_dir / "img_diagram.png")
    return {
        "id": str(meta.get("id", problem_dir.name)),
        "problem": meta["problem_text"],
        "image": {"bytes": image, "path": f"{split}/{problem_dir.name}/img_diagram.png"},
        "choices": choices,
        "answer": choices[LETTERS.index(letter)],
        "answer_letter": letter,
        "choice_values": [str(v) for v in meta.get("precise_value") or []],
        "problem_type_graph": [str(x) for x in meta.get("problem_type_graph") or []],
        "problem_type_goal": [str(x) for x in meta.get("problem_type_goal") or []],
        "split": split,
    }


def _intergps_rows(root: Path, split: str, on_bad_sample: OnBadSample, report: SkipReport) -> Iterator[dict]:
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: split folder not found (expected <root>/<split>/<id>/data.json)")
    dirs = sorted((p for p in split_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name))
    if not dirs:
        raise DataError(f"{split_dir}: split is empty (no problem folders)")
    for d in dirs:
        try:
            yield _intergps_row(d, split)
        except DataError as e:
            if on_bad_sample == "error":
                raise
            report.add(str(d), str(e))


def _hf_rows(ds, split: str, source: str, on_bad_sample: OnBadSample, report: SkipReport) -> Iterator[dict]:
    for key in ("problem", "answer"):
        if key not in ds.column_names:
            raise DataError(f"{source} [{split}]: column '{key}' missing; HF geometry3k needs images, problem, answer")
    image_col = "images" if "images" in ds.column_names else "image" if "image" in ds.column_names else None
    if image_col is None:
        raise DataError(f"{source} [{split}]: no 'images' (or 'image') column")
    from datasets import Image as ImageFeature
    from datasets import List

    ds = ds.cast_column(image_col, List(ImageFeature(decode=False)) if image_col == "images" else ImageFeature(decode=False))
    for i, row in enumerate(ds):
        where = f"{source} [{split}] row {i}"
        try:
            if image_col == "images" and row[image_col] and len(row[image_col]) > 1:
                raise DataError(f"{where}: field 'images' holds {len(row[image_col])} images; this loader keeps "
                                "Geometry3K's one diagram per problem: load the data with data.dataset=files "
                                "(several images per prompt)")
            img = row[image_col][0] if image_col == "images" and row[image_col] else row[image_col]
            if not img:
                raise DataError(f"{where}: field '{image_col}' is empty")
            if img.get("bytes"):
                data = img["bytes"]
                decode_image(data, f"{where}: field '{image_col}'")
            elif isinstance(img.get("path"), str) and img["path"]:
                data = image_file_bytes(Path(img["path"]), f"{where}: field '{image_col}'")
            else:
                raise DataError(f"{where}: field '{image_col}' has neither bytes nor a path")
            for key in ("problem", "answer"):
                if not isinstance(row[key], str) or not row[key].strip():
                    raise DataError(f"{where}: field '{key}' is {row[key]!r}, expected non-empty text")
            problem = row["problem"].replace("<image>", "").strip()
            yield {
                "id": str(row.get("id", f"{split}-{i}")), "problem": problem,
                "image": {"bytes": data, "path": None}, "choices": [], "answer": str(row["answer"]).strip(),
                "answer_letter": "", "choice_values": [], "problem_type_graph": [], "problem_type_goal": [],
                "split": split,
            }
        except DataError as e:
            if on_bad_sample == "error":
                raise
            report.add(where, str(e))


def load_geometry3k(
    source: str | Path = REPO_GEOMETRY3K,
    split: str = "test",
    *,
    layout: str = "auto",
    on_bad_sample: OnBadSample = "error",
):
    """Geometry3K as a ``datasets.Dataset`` in the unified schema.

    Args:
        source: an Inter-GPS root folder (default: the committed copy), a unified or HF parquet file/folder,
            or a hub name such as ``hiyouga/geometry3k`` (needs network access).
        split: 'train' / 'val' / 'test' (HF layout names it 'validation'; both work).
        layout: 'auto', 'intergps', 'hf' or 'unified'.
        on_bad_sample: 'error' raises a DataError naming the file and field; 'skip' drops the sample, counts it
            and warns once with the count.
    """
    from datasets import Dataset

    src = Path(source)
    report = SkipReport()
    if layout == "auto":
        if src.is_dir() and (src / split).is_dir() and any((src / split).glob("*/data.json")):
            layout = "intergps"
        elif src.is_dir() and split in ("validation",) and (src / "val").is_dir():
            split, layout = "val", "intergps"
        else:
            layout = "parquet"
    if layout == "intergps":
        rows = list(_intergps_rows(src, split, on_bad_sample, report))
    else:
        ds = _load_tabular(source, split)
        if "answer_letter" in ds.column_names:  # unified parquet: already in schema
            ds = ds.cast(_features())
            if len(ds) == 0:
                raise DataError(f"{source} [{split}]: no usable samples (the parquet has no rows)")
            return ds
        rows = list(_hf_rows(ds, split, str(source), on_bad_sample, report))
    report.warn(str(source))
    if not rows:
        raise DataError(f"{source} [{split}]: no usable samples (the split is empty or every sample was skipped)")
    return Dataset.from_list(rows, features=_features())


def _load_tabular(source: str | Path, split: str):
    """A split of a parquet file, a folder of parquet files, or a hub dataset name."""
    import datasets

    src = Path(source)
    names = [split] + (["validation"] if split == "val" else ["val"] if split == "validation" else [])
    if src.is_file():
        return datasets.load_dataset("parquet", data_files=str(src), split="train")
    if src.is_dir():
        for name in names:
            files = sorted(src.rglob(f"{name}*.parquet")) or sorted(src.rglob(f"*/{name}/*.parquet"))
            if files:
                return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
        intergps = sorted(d.name for d in src.iterdir() if d.is_dir() and any(d.glob("*/data.json")))
        if intergps:  # an Inter-GPS copy (the bundled one has val and test only) without this split
            raise DataError(f"{src}: this Inter-GPS copy has the splits {intergps} but no {split!r}. The bundled "
                            "copy has no train split: train on the hub's (data.train_source=hiyouga/geometry3k), or "
                            "try the pipeline on the val split (configs/geo3k_smoke.yaml)")
        raise DataError(f"{src}: no parquet files for split {split!r} (looked for {names[0]}*.parquet)")
    if src.exists() is False and "/" in str(source) and not str(source).startswith((".", "/")):
        for name in names:
            try:
                return datasets.load_dataset(str(source), split=name)
            except ValueError:
                continue
        raise DataError(f"{source}: hub dataset has no split {split!r}")
    raise DataError(f"{source}: not found (expected an Inter-GPS folder, a parquet file/folder, or a hub name)")


def geometry3k_prompts(
    ds,
    *,
    template: str = "think_boxed",
    show_choices: bool = False,
    images: ImageStore | None = None,
) -> Iterator[Prompt]:
    """Typed prompts from a unified Geometry3K dataset.

    show_choices=False (default) matches the HF/EasyR1 setting of the GMPO paper: the prompt has no choices and
    the reward grades the answer text. With show_choices=True the choices are listed (A. .. D.) and the reward
    also accepts the letter, the choice text, or a value within 1% of the right choice. ``images`` keeps one
    decoded image per distinct picture (fitted to the processor's budget when it has an ImageFit).
    """
    store = images if images is not None else ImageStore()
    if hasattr(ds, "cast_column"):  # bytes, decoded here with the allowed formats, not by datasets with any of PIL's
        from datasets import Image as ImageFeature

        ds = ds.cast_column("image", ImageFeature(decode=False))
    for row in ds:
        choices = list(row["choices"]) or None
        shown = choices if show_choices else None
        text = render_question(template, row["problem"], shown)
        image = row["image"]
        where = f"geometry3k [{row['split']}] id {row['id']}: field 'image'"
        if isinstance(image, Image.Image):
            image = store.pil(image, where)
        elif image.get("bytes"):
            image = store.bytes(image["bytes"], where)
        else:
            image = store.file(Path(image.get("path") or ""), where)
        values: list[float | str] = []
        for v in row["choice_values"]:
            try:
                values.append(float(v))
            except ValueError:
                values.append(v)
        yield Prompt(
            id=f"geometry3k/{row['split']}/{row['id']}",
            task="geometry3k",
            messages=build_messages(text, 1, template),
            images=[image],
            ground_truth=row["answer_letter"] if shown else row["answer"],
            choices=shown,
            choice_values=(values or None) if shown else None,
            metadata={
                "problem_type_graph": list(row["problem_type_graph"]),
                "problem_type_goal": list(row["problem_type_goal"]),
                "split": row["split"],
                "all_choices": choices,
            },
        )
