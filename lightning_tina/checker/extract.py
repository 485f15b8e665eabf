"""Where the final answer is in a completion, for the strict checker (pure string work, no sympy).

Order of preference: the last closed, non-empty ``\\boxed{...}`` (also ``\\fbox``/``\\framebox``), then the last
"final answer is ...", then the last "answer is ..." / "answer: ...". Without any of these there is no answer:
the strict checker never falls back to "the last number in the text" (a completion cut off mid-reasoning must not
be credited because a number in it happens to equal the gold). Every scan here is linear in the text length, so
adversarial inputs (100k characters, thousands of nested or unclosed braces) stay cheap.
"""

from __future__ import annotations

import re

_BOX_RE = re.compile(r"\\(?:boxed|fbox|framebox)(?![A-Za-z])\s*")
_BRACE_RE = re.compile(r"(?<!\\)[{}]")
_FINAL_RE = re.compile(r"final\s+answer\s*(?:is|:)\s*:?", re.IGNORECASE)
_ANSWER_RE = re.compile(r"\banswer\s*(?:is|:|=)\s*:?", re.IGNORECASE)
_MATH_ENVS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
_INLINE_MATH_RE = re.compile(r"(?<!\\)\$(?P<a>[^$\n]+?)(?<!\\)\$|\\\((?P<b>.+?)\\\)")
_E_NOTATION_RE = re.compile(r"(?<![\w.\\])(\d+(?:\.\d*)?|\.\d+)\s*[eE]\s*([+-]?\d+)(?![\w.])")
_TEXT_NUMBER_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{\s*(-?[\d.,\s]+?)\s*\}")
_E_SUBSCRIPT_RE = re.compile(
    r"(?<![\\A-Za-z])E(?=\s*_)"
)  # latex2sympy reads "E_1" as Euler's e: a syntax error
_SUBSCRIPT_COMMAND_RE = re.compile(r"_(?:\{\s*\\([A-Za-z]+)\s*\}|\\([A-Za-z]+))")  # M_{\odot}, m_{\max}
_CODE_FUNCTION_RE = re.compile(r"\b(?:np|numpy|math)\.([A-Za-z]+)")  # Minerva golds such as np.arcsin(10/13)
_MAX_ANCHORED_CHARS = 300  # an "answer is ..." line longer than this is prose, not an answer


def matching_braces(text: str) -> dict[int, int]:
    """Map the index of every unescaped ``{`` that is closed to the index of its ``}`` (one linear pass)."""
    stack: list[int] = []
    close: dict[int, int] = {}
    for m in _BRACE_RE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            close[stack.pop()] = m.start()
    return close


def last_boxed(text: str) -> str | None:
    """Content of the last closed, non-empty ``\\boxed{}`` (or ``\\fbox``/``\\framebox``), else None.

    Unclosed boxes (a completion cut off inside ``\\boxed{``) and empty ones are skipped. ``\\boxed 5`` (no
    braces) yields the following token.
    """
    starts = list(_BOX_RE.finditer(text))
    if not starts:
        return None
    close = matching_braces(text)
    for m in reversed(starts):
        pos = m.end()
        if pos < len(text) and text[pos] == "{":
            end = close.get(pos)
            content = text[pos + 1 : end].strip() if end is not None else ""
        else:
            token = re.match(r"[^\s$]+", text[pos:])
            content = token.group() if token else ""
        if content:
            return content
    return None


def _find_close(text: str, close_: str, start: int) -> int:
    """Index of the first closing delimiter at or after ``start``; a ``$`` written ``\\$`` does not close."""
    i = text.find(close_, start)
    while close_.startswith("$") and i > 0 and text[i - 1] == "\\":
        i = text.find(close_, i + 1)
    return i


def _first_math_or_line(rest: str) -> str | None:
    """The answer that follows an anchor: a leading math environment, the first inline one, or the line."""
    rest = rest.lstrip(" \t*")
    for open_, close_ in _MATH_ENVS:
        if rest.startswith(open_):
            end = _find_close(rest, close_, len(open_))
            if end > len(open_):
                return rest[len(open_) : end].strip()
            return None
    line = rest.split("\n", 1)[0]
    line = re.split(r"\s+I hope", line, maxsplit=1)[0]
    inline = _INLINE_MATH_RE.search(line)
    if inline:
        return (inline.group("a") or inline.group("b")).strip()
    line = re.split(r"\.(?:\s|$)", line, maxsplit=1)[0].strip().strip("*").strip()
    if not line or len(line) > _MAX_ANCHORED_CHARS:
        return None
    return line


def _after_last(pattern: re.Pattern[str], text: str) -> str | None:
    last = None
    for m in pattern.finditer(text):
        last = m
    return _first_math_or_line(text[last.end() :]) if last is not None else None


def find_final_answer(text: str) -> str | None:
    """The strict checker's final answer: boxed, then "final answer is", then "answer is/:"; else None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_FINAL_RE, _ANSWER_RE):
        found = _after_last(pattern, text)
        if found:
            return found
    return None


def unwrap_math(text: str) -> str:
    """Strip surrounding whitespace and one pair of math delimiters (``$..$``, ``$$..$$``, ``\\(..\\)``,
    ``\\[..\\]``) when they enclose the whole string."""
    s = text.strip()
    for open_, close_ in _MATH_ENVS:
        if s.startswith(open_) and s.endswith(close_) and len(s) > len(open_) + len(close_):
            if _find_close(s, close_, len(open_)) == len(s) - len(close_):  # "$a$ and $b$" stays as it is
                return s[len(open_) : len(s) - len(close_)].strip()
    return s


def normalize_answer(answer: str) -> str:
    """String fixes the strict checker applies before LaTeX parsing (both gold and prediction).

    * e-notation ``4.5e33`` / ``1e-3`` becomes ``4.5\\times 10^{33}`` (LaTeX parsing reads ``e`` as Euler's number);
    * a number wrapped in ``\\text{}``/``\\mathrm{}`` (``\\text{080}``) is unwrapped so it compares as a number;
    * symbols the LaTeX grammar rejects are renamed the same way on both sides: ``E_1`` (read as Euler's
      number), a command as subscript (``M_{\\odot}``), and NumPy-style code (``np.arcsin(x)``);
    * a trailing full stop is dropped.
    """
    s = unwrap_math(answer.strip().removesuffix(".").rstrip())
    s = _TEXT_NUMBER_RE.sub(lambda m: m.group(1), s)
    s = _E_NOTATION_RE.sub(lambda m: f"{m.group(1)}\\times 10^{{{m.group(2)}}}", s)
    s = _E_SUBSCRIPT_RE.sub(r"\\mathcal{E}", s)
    s = _SUBSCRIPT_COMMAND_RE.sub(lambda m: "_{" + (m.group(1) or m.group(2)) + "}", s)
    s = _CODE_FUNCTION_RE.sub(lambda m: "\\" + m.group(1), s)
    return s.rstrip().removesuffix(".").rstrip()


def loose_string_key(answer: str) -> str:
    """A whitespace/spacing-command-insensitive key, used only when neither side parses as math."""
    s = re.sub(r"\\(?:left|right|[,;:!]|displaystyle)", "", answer)
    s = re.sub(r"\\(?:text|mathrm|textbf|mbox)\s*\{([^{}]*)\}", r"\1", s)
    return re.sub(r"\s+", "", s).strip("$").lower()
