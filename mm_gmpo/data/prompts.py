"""The typed prompt every loader produces and every consumer (trainer, evaluator) reads."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image

if TYPE_CHECKING:
    from mm_gmpo.data.videos import Clip

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "templates"
OnBadSample = Literal["error", "skip"]


class DataError(ValueError):
    """Bad input data: the message names the file (or dataset row) and the field, and what to do."""


@dataclass
class Prompt:
    """One problem, ready to render for a VLM or text LM.

    messages: chat messages; image positions are ``{"type": "image"}`` items in user content, in the order of
        ``images``, clip positions ``{"type": "video"}`` items, in the order of ``videos``. ``ground_truth``/``choices``/``choice_values`` go to the reward unchanged; ``choices`` is None
        when the prompt does not show them. ``metadata`` carries e.g. problem types for per-type eval tables.
    """

    id: str
    task: str
    messages: list[dict[str, Any]]
    images: list[Image.Image]
    ground_truth: str
    choices: list[str] | None = None
    choice_values: list[float | str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    videos: list[Clip] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_videos(self) -> int:
        return len(self.videos)


@dataclass
class SkipReport:
    """What a loader dropped in ``on_bad_sample='skip'`` mode, with a reason per item."""

    skipped: list[str] = field(default_factory=list)

    def add(self, where: str, why: str) -> None:
        self.skipped.append(f"{where}: {why}")

    def warn(self, source: str) -> None:
        if self.skipped:
            head = "; ".join(self.skipped[:3])
            warnings.warn(f"{source}: skipped {len(self.skipped)} bad sample(s) ({head}{' ...' if len(self.skipped) > 3 else ''})",
                          stacklevel=3)


def template_path(name: str) -> Path:
    """A template by name from the package's folder (``think_boxed``, ``plain``, ...) or, when ``name`` is a path
    ending in ``.jinja``, that file. Nothing else: a name never walks out of the template folder."""
    if name.endswith(".jinja"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise DataError(f"data.template: {name} is not a file")
        return path
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        options = sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))
        raise DataError(f"data.template: {name!r} is neither a built-in template ({', '.join(options)}) nor a path to "
                        "a .jinja file")
    path = TEMPLATE_DIR / f"{name}.jinja"
    if not path.exists():
        options = sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))
        raise DataError(f"prompt template {name!r} not found in {TEMPLATE_DIR}; choose one of {options}, or give "
                        "the path of your own .jinja file")
    return path


@functools.lru_cache(maxsize=16)
def _template(name: str):
    """The compiled template, in jinja2's sandbox: a template can format its inputs but not reach Python (no
    attribute walks to classes, no calls of unsafe callables)."""
    import jinja2
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(keep_trailing_newline=False, undefined=jinja2.StrictUndefined, autoescape=False)
    return env.from_string(template_path(name).read_text())


def render_question(template: str, problem: str, choices: list[str] | None = None) -> str:
    """Render the user text of a prompt with a template from ``mm_gmpo/templates/`` (e.g. 'think_boxed')."""
    import jinja2

    letters = "ABCDEFGH"
    lettered = [f"{letters[i]}. {c}" for i, c in enumerate(choices)] if choices else None
    try:
        return _template(template).render(content=problem.strip(), choices=lettered).strip()
    except jinja2.TemplateError as e:
        raise DataError(f"data.template {template}: {type(e).__name__}: {e}") from None


def system_prompt(template: str) -> str | None:
    """An optional system prompt that goes with a template (file ``<template>.system.txt``)."""
    path = template_path(template)
    path = path.with_name(path.name.removesuffix(".jinja") + ".system.txt")
    return path.read_text().strip() if path.exists() else None


def build_messages(text: str, n_images: int, template: str, n_videos: int = 0) -> list[dict[str, Any]]:
    """Chat messages: optional system prompt, then one user turn with the clips and images first and the text
    after."""
    content: list[dict[str, Any]] = [{"type": "video"} for _ in range(n_videos)]
    content += [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": text})
    messages: list[dict[str, Any]] = []
    sys = system_prompt(template)
    if sys:
        messages.append({"role": "system", "content": sys})
    messages.append({"role": "user", "content": content if n_images or n_videos else text})
    return messages


def limit_images(prompts: list[Prompt], max_images: int, source: str, max_videos: int | None = None) -> list[Prompt]:
    """Prompts with at most ``max_images`` images (and ``max_videos`` clips); the others are dropped with one
    counted warning."""
    kept = [p for p in prompts if p.n_images <= max_images]
    if len(kept) < len(prompts):
        warnings.warn(f"{source}: dropped {len(prompts) - len(kept)} prompt(s) with more than data.max_images="
                      f"{max_images} images", stacklevel=2)
    if not kept:
        raise DataError(f"{source}: data.max_images={max_images} drops every prompt; raise it")
    if max_videos is not None:
        before = len(kept)
        kept = [p for p in kept if p.n_videos <= max_videos]
        if len(kept) < before:
            warnings.warn(f"{source}: dropped {before - len(kept)} prompt(s) with more than data.max_videos="
                          f"{max_videos} clips", stacklevel=2)
        if not kept:
            raise DataError(f"{source}: data.max_videos={max_videos} drops every prompt; raise it")
    return kept
