"""Any dataset as typed :class:`Prompt` objects: local ``.jsonl`` / ``.json`` / ``.parquet`` files, folders of them,
or a hub dataset id, with an optional ``@split`` suffix (EasyR1's convention: ``hiyouga/geometry3k@train``).

Rows are read as they are; a column mapping says which field is which:

    prompt_key (problem)   the user text; ``<image>`` marks where each image goes (else all images come first)
    answer_key (answer)    the ground truth handed to the reward (a string or a number)
    image_key  (images)    one image or a list: a path (relative paths from ``image_dir``, else the data file's
                           folder), bytes, a ``{"bytes": ..}`` / ``{"path": ..}`` dict (HF Image feature) or a PIL
                           image; missing, null or [] means a text-only prompt
    video_key  (videos)    one clip or a list: a video file (MP4/MOV, MKV/WebM, AVI), a folder of frame images, or
                           a list of frame image paths; ``<video>`` marks where each goes (``mm_gmpo.data.videos``)

Every image and clip is decoded when the data is loaded, so a broken file is a :class:`DataError` naming the file,
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
from mm_gmpo.data.videos import ClipStore

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"  # EasyR1's


@dataclass(frozen=True)
class Columns:
    """Which field of a row is which (EasyR1's defaults)."""

    prompt_key: str = "problem"
    answer_key: str = "answer"
    image_key: str = "images"
    video_key: str = "videos"


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


def interleave(text: str, n_images: int, where: str, n_videos: int = 0) -> list[dict[str, Any]]:
    """User content for ``text`` with an image at each ``<image>`` placeholder and a clip at each ``<video>`` (a
    kind with no placeholder in the text goes first: clips, then images, then the text)."""
    parts = re.split(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})", text)
    content: list[dict[str, Any]] = []
    for marker, n, kind in ((VIDEO_PLACEHOLDER, n_videos, "video"), (IMAGE_PLACEHOLDER, n_images, "image")):
        found = parts.count(marker)
        if found and found != n:
            raise DataError(f"{where}: the prompt has {found} {marker} placeholder(s) but {n} {kind}(s); use one "
                            f"placeholder per {kind}, or none ({kind}s then go first)")
        if not found:
            content += [{"type": kind} for _ in range(n)]
    for part in parts:
        if part == IMAGE_PLACEHOLDER:
            content.append({"type": "image"})
        elif part == VIDEO_PLACEHOLDER:
            content.append({"type": "video"})
        elif part.strip():
            content.append({"type": "text", "text": part})
    return content


# ---------------------------------------------------------------- rows -> prompts


def _row_prompt(where: str, row: Any, index: int, *, cols: Columns, base_dir: Path | None, template: str,
                system_prompt: str | None, task: str, name: str, store: ImageStore, clips: ClipStore) -> Prompt:
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
                            f"{IMAGE_PLACEHOLDER} and clips with {VIDEO_PLACEHOLDER}")
    images = [open_image(e, where, cols.image_key, base_dir, store) for e in _image_entries(row.get(cols.image_key))]
    videos = [clips.read(e, f"{where}: field '{cols.video_key}'", base_dir)
              for e in _clip_entries(row.get(cols.video_key), where, cols.video_key)]
    rendered = render_question(template, problem)
    content = interleave(rendered, len(images), where, len(videos))
    system = template_system_prompt(template) if system_prompt is None else system_prompt
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": content if images or videos else rendered})
    row_id = row.get("id")
    return Prompt(
        id=f"{name}/{row_id if isinstance(row_id, str | int) else index}", task=task, messages=messages,
        images=images, ground_truth=str(answer).strip(), metadata={"source": where}, videos=videos,
    )


def _clip_entries(value: Any, where: str, field: str) -> list[Any]:
    """A row's clips: one entry (a path, a frame folder), a list of them, or a list of frame-path lists; missing,
    null, '' or [] means none."""
    if value is None or (hasattr(value, "__len__") and len(value) == 0):
        return []
    if isinstance(value, str):
        return [value]
    if hasattr(value, "tolist") and not isinstance(value, list):  # parquet gives arrays, of text or of arrays
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [v.tolist() if hasattr(v, "tolist") else v for v in value]
    raise DataError(f"{where}: field '{field}' holds a {type(value).__name__}; give a video path, a folder of "
                    "frames, or a list of them")


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
    clips: ClipStore | None = None,
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
        clips: where decoded clips are kept (one per distinct file or folder, sampled and fitted).
    """
    store = images if images is not None else ImageStore()
    clips = clips if clips is not None else ClipStore()
    rows, data_dir = read_rows(spec, default_split)
    base = Path(image_dir).expanduser() if image_dir else data_dir
    source, _ = parse_source(spec, default_split)
    name = re.sub(r"[^\w.-]+", "_", Path(source).stem if Path(source).suffix in DATA_SUFFIXES else source).strip("_")
    report = SkipReport()
    prompts: list[Prompt] = []
    for i, (where, row) in enumerate(rows):
        try:
            p = _row_prompt(where, row, i, cols=columns, base_dir=base, template=template,
                            system_prompt=system_prompt, task=task, name=name, store=store, clips=clips)
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
