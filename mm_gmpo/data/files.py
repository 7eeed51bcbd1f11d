"""Any dataset as typed :class:`Prompt` objects: local ``.jsonl`` / ``.json`` / ``.parquet`` files, folders of them,
or a hub dataset id, with an optional ``@split`` suffix (EasyR1's convention: ``hiyouga/geometry3k@train``).

Rows are read as they are; a column mapping says which field is which:

    prompt_key (problem)   the user text; ``<image>`` marks where each image goes (else all images come first)
    answer_key (answer)    the ground truth handed to the reward (a string or a number)
    image_key  (images)    one image or a list: a path (relative paths from ``image_dir``, else the data file's
                           folder), bytes, a ``{"bytes": ..}`` / ``{"path": ..}`` dict (HF Image feature) or a PIL
                           image; missing, null or [] means a text-only prompt

Every image is decoded in full when the data is loaded, so a broken file is a :class:`DataError` naming the file,
row and field now, not an exception in the middle of a training step. With ``on_bad_sample="skip"`` bad rows are
dropped, counted and reported once.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mm_gmpo.data.images import ImageStore
from mm_gmpo.data.processing import VISION_TOKENS
from mm_gmpo.data.prompts import DataError, OnBadSample, Prompt, SkipReport, render_question
from mm_gmpo.data.prompts import system_prompt as template_system_prompt

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"  # EasyR1's; refused until clips are read
VIDEO_KEY = "videos"  # EasyR1's video_key default


@dataclass(frozen=True)
class Columns:
    """Which field of a row is which (EasyR1's defaults)."""

    prompt_key: str = "problem"
    answer_key: str = "answer"
    image_key: str = "images"


def parse_source(spec: str, default_split: str = "train") -> tuple[str, str | None]:
    """``'path/or/hub-id@split'`` -> (source, split). No suffix: split None for local files, ``default_split`` for
    the hub. A local path that exists is never split at '@' (folder names may contain one)."""
    spec = spec.strip()
    if Path(spec).exists():
        return spec, None
    if "@" in spec:
        source, split = spec.rsplit("@", 1)
        return source, split or None
    return spec, None if _looks_local(spec) else default_split


def _looks_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(DATA_SUFFIXES) or spec.count("/") != 1


SPLIT_NAMES = {"train": ("train",), "test": ("test", "validation", "val", "dev"),
               "validation": ("validation", "val", "dev", "test"), "val": ("val", "validation", "dev", "test")}


def _split_files(folder: Path, files: list[Path], split: str) -> list[Path]:
    """HF layouts: data/train-00000-of-00001.parquet, train.jsonl, or <split>/*.parquet."""
    return [p for p in files if p.name.startswith(split) or split in p.relative_to(folder).parts[:-1]]


def _files_of(folder: Path, split: str | None, default_split: str = "train") -> list[Path]:
    """The data files of ``folder`` for ``split``. Without one, the folder's files for ``default_split`` (train for
    training; for evaluation the first of validation/val/dev/test found) as for a hub id, so a folder with
    train.jsonl and val.jsonl never trains on both; a folder whose files name no split is read whole."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
    if split is not None:
        files = _split_files(folder, files, split)
    else:
        named = {s: _split_files(folder, files, s) for s in ("train", "validation", "val", "dev", "test")}
        if any(named.values()):
            chosen = next((s for s in SPLIT_NAMES.get(default_split, (default_split,)) if named.get(s)), None)
            if chosen is None:
                found = sorted(s for s, fs in named.items() if fs)
                raise DataError(f"{folder}: no files for the {default_split} split (files found for {found}); name "
                                f"the split as {folder}@<split>")
            files = named[chosen]
    if not files:
        which = f" for split {split!r}" if split else ""
        raise DataError(f"{folder}: no {'/'.join(DATA_SUFFIXES)} files{which}")
    return files


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    if not path.is_file() or path.stat().st_size == 0:  # a FIFO or a /proc file (size 0) could block the read
        raise DataError(f"{path}: empty, or not a regular file; data files are regular .jsonl/.json/.parquet files")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); save it as UTF-8") from None
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield f"{path} line {n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path} line {n}", DataError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})")
            except RecursionError:
                yield f"{path} line {n}", DataError(f"{path} line {n}: JSON nested too deeply to be a data row")
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to be a list of data rows") from None
    if isinstance(data, dict):  # {"data": [...]} / {"train": [...]}: the one list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of rows (or an object holding exactly one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of rows, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{path} row {i}", row


def _undecoded_images(ds):
    """Cast image columns to ``decode=False`` so rows carry bytes/paths that are checked here, not PIL objects
    decoded lazily (and failing) later."""
    from datasets import Image as ImageFeature
    from datasets import List

    for name, feat in ds.features.items():
        if isinstance(feat, ImageFeature):
            ds = ds.cast_column(name, ImageFeature(decode=False))
        elif isinstance(getattr(feat, "feature", None), ImageFeature):
            ds = ds.cast_column(name, List(ImageFeature(decode=False)))
    return ds


def _table_rows(ds, label: str) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(_undecoded_images(ds)):
        yield f"{label} row {i}", row


def read_rows(spec: str, default_split: str = "train") -> tuple[Iterator[tuple[str, Any]], Path | None]:
    """Rows of a data source as ``(where, row)`` pairs (``where`` names the file and row for messages), and the
    folder relative image paths are resolved from (None for the hub)."""
    import datasets

    source, split = parse_source(spec, default_split)
    path = Path(source).expanduser()
    if path.is_dir():
        files = _files_of(path, split, default_split)
        if os.environ.get("RANK", "0") == "0":
            shown = ", ".join(str(f.relative_to(path)) for f in files[:4]) + (" ..." if len(files) > 4 else "")
            print(f"data: {path}{'@' + split if split else ''}: read {len(files)} file(s): {shown}")
        return _chain(files), path
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise DataError(f"{path}: unsupported file type; use {', '.join(DATA_SUFFIXES)}, or a folder of them")
        return _chain([path]), path.parent
    if _looks_local(source):
        raise DataError(f"{source}: no such file or folder (data files are .jsonl, .json or .parquet)")
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # network, unknown name, unknown split: say which
        raise DataError(f"{source}: no such file or folder (relative to {Path.cwd()}), and no hub dataset of that "
                        f"name loads ({type(e).__name__}: {str(e)[:300]})") from None
    return _table_rows(ds, f"{source}@{split}"), None


def _chain(files: list[Path]) -> Iterator[tuple[str, Any]]:
    import datasets

    for f in files:
        if f.suffix == ".parquet":
            try:
                ds = datasets.load_dataset("parquet", data_files=str(f), split="train")
            except Exception as e:
                raise DataError(f"{f}: not a readable parquet file ({type(e).__name__}: {e})") from None
            yield from _table_rows(ds, str(f))
        else:
            yield from _json_rows(f)


# ---------------------------------------------------------------- images


def open_image(entry: Any, where: str, field: str, base_dir: Path | None, store: ImageStore | None = None) -> Image.Image:
    """One image entry (path, bytes, {"bytes"|"path"} dict or PIL image) decoded in full, as RGB (through ``store``:
    one image per distinct file or bytes, fitted to the processor's budget)."""
    store = store if store is not None else ImageStore()
    here = f"{where}: field '{field}'"
    if isinstance(entry, Image.Image):
        return store.pil(entry, here)
    data: Any = None
    path: Any = None
    if isinstance(entry, bytes | bytearray):
        data = bytes(entry)
    elif isinstance(entry, dict):
        data, path = entry.get("bytes"), entry.get("path")
        if data is None and not path:
            raise DataError(f"{here} is a dict without 'bytes' or 'path'")
        if data is not None and not isinstance(data, bytes | bytearray):
            hint = " (base64 text? decode it to bytes, or give a path)" if isinstance(data, str) else ""
            raise DataError(f"{here}: 'bytes' holds a {type(data).__name__}, expected raw image bytes{hint}")
        if data is None and not isinstance(path, str):
            raise DataError(f"{here}: 'path' holds a {type(path).__name__}, expected a file path as text")
    elif isinstance(entry, str):
        path = entry
    else:
        raise DataError(f"{here} holds a {type(entry).__name__}; an image is a path, bytes, a "
                        "{'bytes': ..} / {'path': ..} dict or a PIL image")
    if data is not None:
        return store.bytes(bytes(data), f"{here}: the image bytes")
    if "\0" in path or not path.strip():
        raise DataError(f"{here}: {path!r} is not a file path")
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return store.file(p, here)


def _image_entries(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def interleave(text: str, n_images: int, where: str) -> list[dict[str, Any]]:
    """User content for ``text`` with an image at each ``<image>`` placeholder (all images first if it has none)."""
    parts = text.split(IMAGE_PLACEHOLDER)
    if len(parts) == 1:
        return [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    if len(parts) - 1 != n_images:
        raise DataError(f"{where}: the prompt has {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholder(s) but "
                        f"{n_images} image(s); use one placeholder per image, or none (images then go first)")
    content: list[dict[str, Any]] = []
    for k, part in enumerate(parts):
        if k:
            content.append({"type": "image"})
        if part.strip():
            content.append({"type": "text", "text": part})
    return content


# ---------------------------------------------------------------- rows -> prompts


def _row_prompt(where: str, row: Any, index: int, *, cols: Columns, base_dir: Path | None, template: str,
                system_prompt: str | None, task: str, name: str, store: ImageStore) -> Prompt:
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object with '{cols.prompt_key}' and '{cols.answer_key}', "
                        f"got {type(row).__name__}")
    problem = row.get(cols.prompt_key)
    if problem is None:
        keys = ", ".join(sorted(map(str, row))[:8])
        raise DataError(f"{where}: field '{cols.prompt_key}' missing (row keys: {keys}); set data.prompt_key to "
                        "the field that holds the prompt")
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(f"{where}: field '{cols.prompt_key}' must be non-empty text, got {problem!r:.60}")
    answer = row.get(cols.answer_key)
    if answer is None:
        raise DataError(f"{where}: field '{cols.answer_key}' missing; set data.answer_key to the ground-truth field")
    if isinstance(answer, bool) or not isinstance(answer, str | int | float) or not str(answer).strip():
        raise DataError(f"{where}: field '{cols.answer_key}' must be non-empty text or a number, got {answer!r:.60}")
    if isinstance(answer, float) and not math.isfinite(answer):
        raise DataError(f"{where}: field '{cols.answer_key}' is {answer}, not a ground truth; fix or drop the row")
    for tok in VISION_TOKENS:
        if tok in problem:
            raise DataError(f"{where}: field '{cols.prompt_key}' contains the special token {tok}; mark images with "
                            f"{IMAGE_PLACEHOLDER}")
    _refuse_video(row, problem, where, cols)
    images = [open_image(e, where, cols.image_key, base_dir, store) for e in _image_entries(row.get(cols.image_key))]
    rendered = render_question(template, problem)
    content = interleave(rendered, len(images), where)
    system = template_system_prompt(template) if system_prompt is None else system_prompt
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": content if images else rendered})
    row_id = row.get("id")
    return Prompt(
        id=f"{name}/{row_id if isinstance(row_id, str | int) else index}", task=task, messages=messages,
        images=images, ground_truth=str(answer).strip(), metadata={"source": where},
    )


def _refuse_video(row: dict, problem: str, where: str, cols: Columns) -> None:
    """Video clips are not read yet: a row that carries them (EasyR1's ``videos`` field) or marks one with
    ``<video>`` is refused rather than trained with the clip silently dropped and the marker left as text."""
    clips = row.get(VIDEO_KEY)
    empty = clips is None or (hasattr(clips, "__len__") and len(clips) == 0)  # '', [] or an empty array
    if not empty and cols.image_key != VIDEO_KEY:
        raise DataError(f"{where}: field '{VIDEO_KEY}' holds video clips, which mm_gmpo does not read yet (pictures "
                        f"only); extract frames into '{cols.image_key}', drop the field, or set "
                        "data.on_bad_sample=skip to leave such rows out")
    if VIDEO_PLACEHOLDER in problem:
        raise DataError(f"{where}: field '{cols.prompt_key}' marks a video with {VIDEO_PLACEHOLDER}, which mm_gmpo "
                        f"does not read yet (pictures only); use {IMAGE_PLACEHOLDER} with frames in "
                        f"'{cols.image_key}'")


def load_file_prompts(
    spec: str,
    *,
    columns: Columns = Columns(),
    image_dir: str | Path | None = None,
    template: str = "plain",
    system_prompt: str | None = None,
    task: str = "math",
    on_bad_sample: OnBadSample = "error",
    default_split: str = "train",
    images: ImageStore | None = None,
) -> list[Prompt]:
    """Prompts from a data file, folder or hub dataset (see the module docstring).

    Args:
        spec: ``path`` or ``hub/id``, optionally ``@split`` (hub default: ``default_split``).
        image_dir: base folder of relative image paths (default: the data file's folder).
        template: a template in ``mm_gmpo/templates`` applied to the prompt text ('plain' leaves it as it is).
        system_prompt: None = the template's own (if any); '' = none; otherwise this text.
        task: the built-in reward task of these rows (math, geometry3k or exact).
        on_bad_sample: 'error' raises a DataError naming the file, row and field; 'skip' drops, counts, warns.
        images: where decoded images are kept (one per distinct file, fitted to the processor's budget).
    """
    store = images if images is not None else ImageStore()
    rows, data_dir = read_rows(spec, default_split)
    base = Path(image_dir).expanduser() if image_dir else data_dir
    source, _ = parse_source(spec, default_split)
    name = re.sub(r"[^\w.-]+", "_", Path(source).stem if Path(source).suffix in DATA_SUFFIXES else source).strip("_")
    report = SkipReport()
    prompts: list[Prompt] = []
    for i, (where, row) in enumerate(rows):
        try:
            p = _row_prompt(where, row, i, cols=columns, base_dir=base, template=template,
                            system_prompt=system_prompt, task=task, name=name, store=store)
        except DataError as e:
            if on_bad_sample == "error":
                raise
            report.add(where, str(e))
            continue
        prompts.append(p)
    report.warn(spec)
    if not prompts:
        raise DataError(f"{spec}: no usable samples (empty, or every row was skipped)")
    return prompts
