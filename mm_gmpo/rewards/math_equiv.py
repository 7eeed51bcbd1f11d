"""Math answer equivalence with math-verify, under a per-item deadline.

math-verify does the real work (LaTeX parsing, sympy equivalence, units, percentages, degrees). Its own timeouts
are whole seconds each; we turn them off and put one float deadline (SIGALRM via setitimer) around everything an
item does, so one item never takes much more than ``deadline`` seconds. Outside the main thread signals cannot be
used; there the input caps (answers of at most MAX_ANSWER_CHARS) are the only bound, and ``score_batch`` with
worker processes gives the hard guarantee.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import signal
import threading

from mm_gmpo.rewards.extract import MAX_ANSWER_CHARS

logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # it logs every timeout and parse failure


class DeadlineExceeded(BaseException):
    """Raised when an item's time is up. A BaseException so that libraries' `except Exception` cannot swallow it."""


@contextlib.contextmanager
def deadline(seconds: float | None):
    """Raise DeadlineExceeded in the block after ``seconds`` (main thread only; no-op elsewhere or for None)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _handler(signum, frame):
        raise DeadlineExceeded()

    old = signal.signal(signal.SIGALRM, _handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_SPACE = re.compile(r"\s+")
_MATH_DOLLAR = re.compile(r"(?<!\\)\$")  # a $ that is not escaped
_UNITS = re.compile(
    r"\s*(?:\\(?:text|mathrm|mbox)\{\s*)?(?:cm|mm|km|m|in|inches|inch|ft|feet|yd|units?|sq|square|degrees?)"
    r"(?:\^?\{?[23]\}?)?\s*\}?\s*$"
)


def normalize(ans: str) -> str:
    """Cheap textual normalisation used for the fast path only (math-verify decides everything else)."""
    s = ans.replace("\\$", "").strip().strip("$").strip()  # "\\$18" is a currency sign, not a math delimiter
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "").replace("\\ ", "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac").replace("^\\circ", "").replace("^{\\circ}", "")
    s = _UNITS.sub("", s)
    s = _SPACE.sub("", s).rstrip(".")
    return s


def _plain_float(s: str) -> float | None:
    try:
        v = float(s.replace(",", "")) if len(s) < 40 else None
    except ValueError:
        return None
    return v if v is not None and math.isfinite(v) else None


@functools.lru_cache(maxsize=8192)
def _parse(text: str):
    from math_verify import parse

    # an escaped dollar (\\$18) is a currency sign, not a math delimiter: such text still needs wrapping
    wrapped = text if _MATH_DOLLAR.search(text) or "\\boxed" in text else f"${text}$"
    return parse(wrapped, parsing_timeout=None)


@functools.cache
def warm_up() -> None:
    """Import math-verify and run one parse/verify, once per process, outside any item's deadline."""
    from math_verify import verify

    verify(_parse("\\frac{1}{2}"), _parse("0.5"), timeout_seconds=None)


def math_equal(pred: str, gold: str) -> bool:
    """True when ``pred`` and ``gold`` are the same mathematical answer. Call inside :func:`deadline`."""
    if not pred or len(pred) > MAX_ANSWER_CHARS:
        return False
    p, g = normalize(pred), normalize(gold)
    if p == g and p:
        return True
    pf, gf = _plain_float(p), _plain_float(g)
    if pf is not None and gf is not None:
        return math.isclose(pf, gf, rel_tol=1e-9, abs_tol=1e-12)
    from math_verify import verify

    gold_parsed, pred_parsed = _parse(gold), _parse(pred)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def numeric_value(ans: str) -> float | None:
    """A float for an answer like '7.07', '5 \\sqrt { 2 }', '\\frac{3}{5}\\pi', '12 cm'; None if not numeric."""
    if not ans or len(ans) > MAX_ANSWER_CHARS:
        return None
    s = normalize(ans)
    v = _plain_float(s)
    if v is not None:
        return v
    parsed = _parse(ans)
    for expr in parsed:
        if isinstance(expr, str):
            continue
        try:
            if getattr(expr, "free_symbols", None):
                continue
            val = complex(expr.evalf(15))
        except Exception:
            continue
        if abs(val.imag) < 1e-12 and math.isfinite(val.real):
            return float(val.real)
    return None
