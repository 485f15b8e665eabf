"""Multiple-choice letter extraction (GPQA): Tina's lighteval behaviour and a strict one.

Tina-compatible (``strict=False``) reproduces lighteval 0.8's native-letter extraction: regexes tried by
priority, and within one priority the match that ends last wins. Only capital letters are read, and the
lowest-priority rule takes any capital A-D anywhere, so the "A" of a sentence or the "C" of "C=O" can be taken.

Strict (``strict=True``) reads only an anchored answer: ``\\boxed{C}``, "final answer is (C)", "Answer: c",
"answer is **C**", "the correct option is C", "final: D"; upper or lower case, with optional parentheses,
brackets, bold or ``\\text{}``; the last anchored one wins. Without an anchor there is no answer.
"""

from __future__ import annotations

import re
from functools import lru_cache

from lightning_tina.checker.extract import last_boxed


@lru_cache(maxsize=8)
def _tina_patterns(letters: str) -> list[tuple[int, re.Pattern[str]]]:
    """lighteval 0.8 native-letter regexes for these letters, as (priority, pattern), lowest priority first."""
    key = f"(?P<letter>{'|'.join(re.escape(c) for c in letters)})"
    suffix = r"(?:\*\*)?(?:\.|,|:| |$)"
    spaced = rf"(?:^| )(?:\*\*)?{key}{suffix}"
    rules = [
        (0, rf"(?i:final answer is):?\s*{key}\.?\s?I hope"),
        (50, rf"(?i:final answer.{{0,100}}?)\s+is:?\s*{key}"),
        (100, rf"(?i:answer):.{{0,50}}?{spaced}"),
        (150, rf"(?i:answer).{{0,50}}?{spaced}"),
        (200, rf"^(?:\*\*)?{key}{suffix}"),
        (250, spaced),
        (300, key),
    ]
    return [(priority, re.compile(pattern)) for priority, pattern in rules]


def extract_letter_tina(text: str, letters: str = "ABCD") -> str | None:
    """The letter lighteval 0.8 would extract from ``text`` (None if no rule matches)."""
    for _, pattern in _tina_patterns(letters):
        best: tuple[int, int, str] | None = None  # (end, -start, letter): rightmost end, then leftmost start
        for m in pattern.finditer(text):
            cand = (m.end(), -m.start(), m.group("letter"))
            if best is None or cand[:2] > best[:2]:
                best = cand
        if best is not None:
            return best[2]
    return None


@lru_cache(maxsize=8)
def _strict_patterns(letters: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    cls = "".join(re.escape(c) for c in letters.upper() + letters.lower())
    wrapped = (
        rf"(?:\\text\{{|\\textbf\{{|\\mathrm\{{)?\s*[(\[]?\s*(?P<letter>[{cls}])\s*[)\]]?\s*\}}?"
        r"(?![A-Za-z0-9])"
    )
    box_only = re.compile(rf"^\s*{wrapped}\s*\.?\s*$")
    # "answer C", "answer is (C)", "Answer: **C**"; "option/choice/final" only with "is" or a colon
    anchor = r"(?i:answer\s*(?:is|:)?|(?:option|choice|final)\s*(?:is|:))"
    anchored = re.compile(
        rf"{anchor}\s*(?:\*\*)?\s*:?\s*(?:\*\*)?\s*(?:\$\s*)?(?i:option\s+|choice\s+)?{wrapped}"
    )
    return box_only, anchored


def extract_letter_strict(text: str, letters: str = "ABCD") -> str | None:
    """The anchored answer letter (upper-cased), or None; see the module docstring for what counts."""
    box_only, anchored = _strict_patterns(letters)
    boxed = last_boxed(text)
    if boxed is not None:
        m = box_only.match(boxed)
        if m:
            return m.group("letter").upper()
    last = None
    for m in anchored.finditer(text):
        last = m
    if last is None:
        return None
    letter = last.group("letter")
    # A lowercase letter right after "answer is" is usually an article ("the answer is a bit ..."): demand a
    # delimiter for it (parenthesis, colon form, or end of sentence).
    if letter.islower():
        tail = text[last.end() : last.end() + 1]
        span = last.group(0)
        if not ("(" in span or "[" in span or ":" in span or tail in ("", ".", "\n", ",", ")")):
            return None
    return letter.upper()
