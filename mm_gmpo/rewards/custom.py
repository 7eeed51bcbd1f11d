"""Your own reward function, named by path: ``path/to/file.py:fn`` or ``package.module:fn``.

Two contracts are accepted, the ones people already have:

* batch (EasyR1): ``fn(reward_inputs: list[dict], **reward_kwargs) -> list[dict]``; each input carries
  ``response``, ``response_length`` and ``ground_truth``; each score carries ``overall`` plus any extra float
  keys (``accuracy``, ``format``, ...), which become ``reward/<key>`` metrics.
* item: ``fn(response, ground_truth, **reward_kwargs) -> float | dict`` (a dict as above).

``reward_type="auto"`` picks batch when ``fn`` takes one positional parameter, item when it takes two or more.

The function runs like the built-in verifiers: in reward worker processes (or in-process with 0 workers), under a
per-item deadline. Its mistakes are the user's, so they are reported plainly: :func:`probe` calls it once on one
sample before the first rollout and a missing file, a missing function, a wrong signature, a raising call or a
wrong return shape stops the run with a message naming the file, the function and what was expected. At run time a
call that raises or times out scores its items 0 and counts them (``reward/errors``); it never stops the run.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import importlib
import importlib.util
import inspect
import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm_gmpo.config import ConfigError
from mm_gmpo.rewards.math_equiv import DeadlineExceeded, deadline

Score = dict[str, float]
FLOAT32_MAX = 3.4028234663852886e38


def probe_hard_limit_s(timeout_s: float) -> float:
    """Seconds after which a probe call that no signal can interrupt ends the process (with a traceback)."""
    return 2 * timeout_s + 5


class RewardFunctionError(ConfigError):
    """The configured reward function cannot be used; the message names the file, the function and the fix."""


@dataclass(frozen=True)
class RewardFunction:
    """What a worker needs to load and call a user reward function (picklable; the function itself is not)."""

    spec: str  # "/abs/path/file.py:fn" or "package.module:fn"
    kwargs: dict = field(default_factory=dict)
    kind: str = "auto"  # auto | batch | item
    timeout_s: float = 10.0

    def __hash__(self) -> int:
        return hash((self.spec, self.kind, self.timeout_s, repr(sorted(self.kwargs.items(), key=lambda kv: str(kv[0])))))


def resolve_spec(spec: str, base_dir: str | Path | None = None) -> str:
    """A spec with its file path made absolute (workers may start elsewhere), checked for existence."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise RewardFunctionError(f"algorithm.reward_function = {spec!r}: expected path/to/file.py:function or "
                                  "package.module:function")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_absolute():
            path = Path(base_dir or Path.cwd()) / path
        if not path.is_file():
            raise RewardFunctionError(f"algorithm.reward_function: file {path} not found (from {spec!r}); give a "
                                      "path to a .py file, relative to the directory you launch from")
        return f"{path.resolve()}:{name}"
    return spec


@functools.lru_cache(maxsize=8)
def load_function(spec: str) -> Callable[..., Any]:
    """Import the file or module of ``spec`` and return its function (cached per process)."""
    target, _, name = spec.rpartition(":")
    where = target
    try:
        if target.endswith(".py"):
            path = Path(target)
            mod_name = f"mm_gmpo_user_reward_{abs(hash(str(path)))}"
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            if module_spec is None or module_spec.loader is None:
                raise RewardFunctionError(f"algorithm.reward_function: cannot import {path}")
            module = importlib.util.module_from_spec(module_spec)
            sys.path.insert(0, str(path.parent))  # the file may import its neighbours
            try:
                sys.modules[mod_name] = module
                module_spec.loader.exec_module(module)
            finally:
                sys.path.remove(str(path.parent))
        else:
            module = importlib.import_module(target)
    except RewardFunctionError:
        raise
    except Exception as e:
        own = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == target]
        at = f" (line {own[-1].lineno})" if own else ""
        raise RewardFunctionError(f"algorithm.reward_function: importing {where} failed{at}: "
                                  f"{type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if fn is None:
        funcs = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and not k.startswith("_"))
        raise RewardFunctionError(f"algorithm.reward_function: {where} has no function {name!r}; it defines "
                                  f"{funcs or 'no public functions'}")
    if not callable(fn):
        raise RewardFunctionError(f"algorithm.reward_function: {where}:{name} is a {type(fn).__name__}, not a "
                                  "function")
    return fn


def contract(fn: Callable[..., Any], kind: str, label: str) -> str:
    """'batch' or 'item' for ``fn`` (see the module docstring), checking that the signature fits."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return "batch" if kind == "auto" else kind
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
    if kind == "auto":
        kind = "batch" if len(required) <= 1 and not (varargs and not required) else "item"
    need = 1 if kind == "batch" else 2
    if not varargs and len(positional) < need:
        expected = ("fn(reward_inputs: list[dict], **kwargs) -> list[dict]" if kind == "batch" else
                    "fn(response: str, ground_truth: str, **kwargs) -> float | dict")
        raise RewardFunctionError(f"algorithm.reward_function: {label} takes {len(positional)} positional "
                                  f"parameter(s); a {kind} reward function is {expected}")
    return kind


def to_score(out: Any, label: str) -> Score:
    """One item's result as floats: a number is ``overall``; a dict needs ``overall``; other numeric keys stay."""
    if isinstance(out, bool) or not isinstance(out, int | float | dict):
        raise RewardFunctionError(f"{label} returned {type(out).__name__} {out!r:.80} for an item; expected a float "
                                  "or a dict with an 'overall' float")
    if not isinstance(out, dict):
        out = {"overall": out}
    if "overall" not in out:
        raise RewardFunctionError(f"{label} returned a dict without 'overall' (keys: {sorted(out)}); add "
                                  "'overall', the reward the policy is trained on")
    score: Score = {}
    for k, v in out.items():
        if (isinstance(v, int | float) and not isinstance(v, bool)) or k == "overall":
            try:
                score[str(k)] = float(v)
            except (TypeError, ValueError):
                raise RewardFunctionError(f"{label} returned overall={v!r}; expected a float") from None
    for k, v in score.items():  # rewards are trained on in float32: 1e39 is finite here and inf there
        if not math.isfinite(v) or abs(v) > FLOAT32_MAX:
            raise RewardFunctionError(f"{label} returned {k}={v}; expected a finite float within float32's range "
                                      f"(|x| <= {FLOAT32_MAX:.3g})")
    return score


class _Caller:
    """Calls a loaded reward function on items, isolating failures item by item."""

    def __init__(self, rf: RewardFunction):
        self.rf = rf
        self.fn = load_function(rf.spec)
        self.label = rf.spec.rsplit("/", 1)[-1]
        self.kind = contract(self.fn, rf.kind, self.label)

    def _batch(self, items: list[dict]) -> list[Score]:
        with deadline(self.rf.timeout_s * len(items)):
            out = self.fn([dict(x) for x in items], **self.rf.kwargs)
        if not isinstance(out, list | tuple) or len(out) != len(items):
            got = f"{len(out)} results" if isinstance(out, list | tuple) else f"a {type(out).__name__}"
            raise RewardFunctionError(f"{self.label} returned {got} for {len(items)} reward input(s); a batch "
                                      "reward function returns a list with one dict per input, in order")
        return [to_score(o, self.label) for o in out]

    def _item(self, item: dict) -> Score:
        with deadline(self.rf.timeout_s):
            out = self.fn(item["response"], item["ground_truth"], **self.rf.kwargs)
        return to_score(out, self.label)

    def __call__(self, items: list[dict]) -> list[tuple[Score, str | None]]:
        """(score, error message or None) per item; an item whose call fails scores overall 0."""
        if self.kind == "batch":
            try:
                return [(s, None) for s in self._batch(items)]
            except (Exception, DeadlineExceeded, SystemExit) as e:
                if len(items) == 1:
                    return [({"overall": 0.0}, _describe(e))]
            return [r for it in items for r in self([it])]  # find the items that fail
        out = []
        for it in items:
            try:
                out.append((self._item(it), None))
            except (Exception, DeadlineExceeded, SystemExit) as e:
                out.append(({"overall": 0.0}, _describe(e)))
        return out


def _describe(e: BaseException) -> str:
    return "timed out" if isinstance(e, DeadlineExceeded) else f"{type(e).__name__}: {e}"


@functools.lru_cache(maxsize=8)
def caller(rf: RewardFunction) -> _Caller:
    """The loaded function of ``rf`` (cached per process: workers load it once)."""
    return _Caller(rf)


def reward_input(response: str, ground_truth: str, response_length: int) -> dict:
    """One item of the batch contract (EasyR1's keys)."""
    return {"response": response, "response_length": int(response_length), "ground_truth": ground_truth}


def probe(rf: RewardFunction, ground_truth: str) -> Score:
    """Load ``rf`` and call it on one sample (the ground truth as the response) before training starts.

    Raises RewardFunctionError naming the file, the function and what was expected if anything is wrong.
    """
    c = caller(rf)
    item = reward_input(f"\\boxed{{{ground_truth}}}", ground_truth, 1)
    # the SIGALRM deadline cannot interrupt C code (sum(range(10**13))): past a hard limit faulthandler's own
    # thread prints where the call is (the function's file and line) and ends the process instead of a silent hang
    # (to the process's own stderr: a captured sys.stderr may have no file descriptor; without one, SIGALRM alone)
    with contextlib.suppress(AttributeError, OSError, ValueError):
        faulthandler.dump_traceback_later(probe_hard_limit_s(rf.timeout_s), exit=True, file=sys.__stderr__)
    try:
        if c.kind == "batch":
            return c._batch([item])[0]
        return c._item(item)
    except RewardFunctionError as e:
        raise RewardFunctionError(f"algorithm.reward_function: probe call on one sample: {e}") from None
    except DeadlineExceeded:
        raise RewardFunctionError(f"algorithm.reward_function: {c.label} took longer than "
                                  f"algorithm.reward_timeout_s={rf.timeout_s} s on one sample") from None
    except (Exception, SystemExit) as e:
        tb = traceback.extract_tb(e.__traceback__)
        at = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        expected = ("fn(reward_inputs: list[dict], **kwargs) -> list[dict]" if c.kind == "batch" else
                    "fn(response, ground_truth, **kwargs) -> float | dict")
        raise RewardFunctionError(f"algorithm.reward_function: {c.label} raised {type(e).__name__}: {e}{at} when "
                                  f"called as a {c.kind} function, {expected}, on one sample "
                                  f"(reward_kwargs={rf.kwargs})") from None
    finally:
        faulthandler.cancel_dump_traceback_later()
