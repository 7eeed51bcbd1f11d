"""Answer extraction from model responses. Linear-time, bounded, never raises on any string."""

from __future__ import annotations

import re

MAX_ANSWER_CHARS = 512  # a final answer longer than this is not an answer
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_MAX_BOX_TRIES = 4
LETTERS = "ABCDEFGH"


def _balanced_group(text: str, open_pos: int, limit: int = MAX_ANSWER_CHARS) -> str | None:
    """Content of the brace group opening at text[open_pos] == '{', or None if unbalanced within ``limit``."""
    depth = 0
    end = min(len(text), open_pos + limit + 2)
    for i in range(open_pos, end):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : i]
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces allowed; also ``\\boxed 5``."""
    pos = len(text)
    for _ in range(_MAX_BOX_TRIES):
        starts = [(text.rfind(cmd, 0, pos), cmd) for cmd in _BOX_COMMANDS]
        start, cmd = max(starts)
        if start < 0:
            return None
        j = start + len(cmd)
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            content = _balanced_group(text, j)
            if content is not None:
                return content.strip()
        elif j > start + len(cmd) and j < len(text):  # "\boxed 5": one token after a space
            m = re.match(r"[^\s$]{1,64}", text[j : j + 64])
            if m:
                return m.group(0)
        pos = start
    return None


_ANSWER_TAG = re.compile(rf"<answer>(.{{0,{MAX_ANSWER_CHARS}}}?)</answer>", re.DOTALL)


def extract_answer_tag(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>``."""
    last = None
    start = text.rfind("<answer>")
    if start >= 0:
        m = _ANSWER_TAG.match(text, start)
        if m:
            last = m.group(1).strip()
    return last


_CHOICE_PHRASE = re.compile(
    r"(?:answer|choice|option)\s*(?:is|:)?\s*(?:\*\*)?\s*[\(\[]?\s*([A-H])\s*[\)\]]?(?![A-Za-z])",
    re.IGNORECASE,
)
_LETTER_ONLY = re.compile(r"^\s*[\(\[]?\s*([A-H])\s*[\)\]]?\s*(?:[.:]\s*.*)?$", re.DOTALL)
_TRAILING_LETTER = re.compile(r"(?:^|[\s\(\[*])([A-H])[\)\]]?[*.\s]*$")


def letter_of(answer: str, n_choices: int) -> str | None:
    """The choice letter that an extracted answer names: 'B', '(B)', 'B.', 'B: 60', '\\text{B}'."""
    a = answer.strip()
    m = re.fullmatch(r"\\(?:text|mathrm|textbf)\{\s*([A-H])\s*\}", a)
    if m:
        a = m.group(1)
    m = _LETTER_ONLY.match(a[:MAX_ANSWER_CHARS])
    if m and LETTERS.index(m.group(1)) < n_choices:
        # "B. 60" or "B" -> B ; but not "A = 30" style equations
        rest = a[a.find(m.group(1)) + 1 :].lstrip(" )]")
        if not rest or rest[0] in ".:":
            return m.group(1)
    return None


def extract_choice_letter(text: str, n_choices: int) -> str | None:
    """A choice letter stated in free text: "the answer is (B)", "Answer: C", or a bare final letter."""
    tail = text[-400:]
    found = None
    for m in _CHOICE_PHRASE.finditer(tail):
        if m.group(1).isupper() and LETTERS.index(m.group(1)) < n_choices:
            found = m.group(1)
    if found:
        return found
    last_line = tail.rstrip().rsplit("\n", 1)[-1]
    m = _TRAILING_LETTER.search(last_line)
    if m and LETTERS.index(m.group(1)) < n_choices:
        # a last line naming several letters ("A, B, C or D") is no answer: never reward listing every choice
        named = set(re.findall(r"(?<![A-Za-z])([A-H])(?![A-Za-z])", last_line))
        return m.group(1) if len(named) == 1 else None
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a response: last ``\\boxed{}``, else the last ``<answer>`` tag, else None."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    tag = extract_answer_tag(text)
    if tag is not None:
        inner = extract_boxed(tag)
        return inner if inner is not None else tag
    return None


def has_think_then_boxed(text: str) -> bool:
    """Default format: ``<think>...</think>`` (first thing in the response) followed by a final ``\\boxed{}``."""
    s = text.lstrip()
    if not s.startswith("<think>"):
        return False
    close = s.find("</think>", len("<think>"))
    if close < 0 or s.find("<think>", len("<think>"), close) >= 0:
        return False
    after = s[close + len("</think>") :]
    return "</think>" not in after and extract_boxed(after) is not None
