"""Turn one raw dataset row into the row GRPO trains on: {"problem", "solution", ...extras}.

`solution` is the gold answer that the accuracy reward checks, as a math string: a bare final answer is wrapped in
$...$ as Tina does (`f"${answer}$"`), so that math-verify reads it as LaTeX. Worked solutions are kept aside in
`solution_archive`. Rules, after the entry's column mapping is applied:

- problem: the column mapped to "problem", else the first of the entry's aliases (problem, question, prompt);
- gold: the "answer" column if present (a worked "solution" then goes to solution_archive); else the "solution"
  column: its last \\boxed{...} if it has one (the full text goes to solution_archive), or the whole value when it
  is a short one-line answer;
- l1 variants add `target_length`, drawn uniformly from the entry's range with the caller's RNG.

With `gold: tina` (the entry's `gold`) the gold follows Tina's `grpo.py` instead: the `solution` column verbatim
when the row has one (a worked solution stays the gold; Tina's accuracy reward lets math-verify extract the answer
from it), else f"${answer}$" with the answer untouched (no stripping, no check for existing delimiters). Entries
whose Tina special case preferred the answer (DeepScaleR) say so in `tina_gold`.

A row that breaks a rule raises RowError, which names the dataset, row, column and the mapping that fixes it; a
caller streaming rows catches it, counts it by `kind`, and moves on.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lightning_tina.data_sources.registry import DatasetEntry

RowErrorKind = Literal["missing_column", "empty", "bad_value", "unparseable"]
ParseStatus = Literal["sympy", "string", "none"]

_PROBLEM_HINTS = ("question", "prompt", "problem", "query", "input", "instruction", "context", "text")
_ANSWER_HINTS = (
    "answer",
    "final",
    "final_answer",
    "ground_truth",
    "gold",
    "target",
    "expected_answer",
    "label",
    "result",
)
_MATH_DELIMITERS = (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_BARE_ANSWER_MAX_CHARS = (
    200  # longer (or multi-line) text without \boxed{} is a worked solution, not an answer
)


class RowError(ValueError):
    """A row that cannot be normalized. Catch it to skip and count bad rows (`kind` says why)."""

    def __init__(
        self,
        entry: DatasetEntry,
        index: int | None,
        column: str,
        kind: RowErrorKind,
        reason: str,
        fix: str,
        row_columns: Sequence[str] = (),
    ) -> None:
        self.dataset = entry.name
        self.index = index
        self.column = column
        self.kind: RowErrorKind = kind
        self.reason = reason
        self.fix = fix
        self.row_columns = list(row_columns)
        where = f"row {index}" if index is not None else "a row"
        has = f" The row has columns {self.row_columns}." if self.row_columns else ""
        super().__init__(f"dataset {entry.describe()}, {where}, column {column!r}: {reason}.{has} Fix: {fix}")


class DataValidationError(ValueError):
    """The start-up check failed: the first rows of a dataset do not normalize."""

    def __init__(self, message: str, errors: list[RowError]) -> None:
        super().__init__(message)
        self.errors = errors


def row_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A per-row RNG that depends only on (seed, epoch, stream position), so a resumed run redraws the same l1
    target lengths. (String seeds are hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.)"""
    return random.Random(f"{seed}/{epoch}/{index}")


def get_path(row: dict[str, Any], path: str) -> Any:
    """The value at `path` in a row: a column name, or dot-separated keys/indices into nested values, where a
    JSON string along the way is decoded ("verification_info.answer.value"). Raises KeyError when absent."""
    if path in row:
        return row[path]
    value: Any = row
    for depth, part in enumerate(path.split(".")):
        if isinstance(value, str) and depth > 0 and value.lstrip()[:1] in ("{", "["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise KeyError(
                    f"{'.'.join(path.split('.')[:depth])!r} is not valid JSON ({err.msg})"
                ) from None
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif (
            isinstance(value, (list, tuple))
            and part.lstrip("-").isdigit()
            and -len(value) <= int(part) < len(value)
        ):
            value = value[int(part)]
        else:
            raise KeyError(f"{part!r} not found under {'.'.join(path.split('.')[:depth]) or 'the row'!r}")
    return value


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces matched; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None  # unbalanced braces


def wrap_math(answer: str) -> str:
    """Tina's gold format: a bare answer wrapped in $...$ (left alone when already math-delimited)."""
    answer = answer.strip()
    if any(
        answer.startswith(a) and answer.endswith(b) and len(answer) > len(a) + len(b)
        for a, b in _MATH_DELIMITERS
    ):
        return answer
    return f"${answer}$"


def answer_parse_status(solution: str) -> ParseStatus:
    """How math-verify reads a gold, called as Tina's accuracy reward calls it (`parse(sol, first_match)`):
    "sympy" (an expression), "string" (only a string fallback; verify then compares strings) or "none"
    (nothing extracted: Tina's reward is None for every completion, so the row cannot teach anything)."""
    from math_verify import parse  # heavy import (sympy), only when needed

    in_main = threading.current_thread() is threading.main_thread()  # math-verify's timeout uses signal.alarm
    parsed = parse(solution, extraction_mode="first_match", parsing_timeout=5 if in_main else None)
    if not parsed:
        return "none"
    return "string" if all(isinstance(p, str) for p in parsed) else "sympy"


def _suggest(row: dict[str, Any], hints: Sequence[str], target: str, taken: set[str]) -> str:
    """The mapping most likely to fix a missing column: a column with a telling name, the chat messages, or the
    only column left; else a placeholder."""
    free = [c for c in row if c not in taken]
    named = [c for c in free if c.lower().replace(" ", "_") in hints]
    if named:
        return f"add `columns: {{{named[0]}: {target}}}` to this data source"
    if target == "problem" and isinstance(row.get("messages"), list):
        return "add `columns: {messages.0.content: problem}` to this data source"
    if len(free) == 1:
        return f"add `columns: {{{free[0]}: {target}}}` to this data source"
    return f"add `columns: {{<your {target} column>: {target}}}` to this data source"


def _as_text(
    entry: DatasetEntry, value: Any, index: int | None, column: str, what: str, row: dict[str, Any]
) -> str:
    if value is None:
        value = ""  # a null cell is an empty value, not a type error
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        hint = (
            f"map one element, e.g. `columns: {{{column}.0: {what}}}`"
            if isinstance(value, list)
            else (f"map a column that holds the {what} as text")
        )
        raise RowError(
            entry, index, column, "bad_value", f"the {what} is a {type(value).__name__}", hint, list(row)
        )
    text = value if isinstance(value, str) else str(value)
    if not text.strip():
        raise RowError(
            entry,
            index,
            column,
            "empty",
            f"the {what} is empty",
            f"drop the row or map another column to `{what}`",
            list(row),
        )
    return text


def normalize(
    entry: DatasetEntry,
    raw_row: dict[str, Any],
    *,
    rng: random.Random | None = None,
    index: int | None = None,
    check_answer: bool = True,
) -> dict[str, Any]:
    """Normalize one raw row to {"problem", "solution", ...extras} (see the module docstring for the rules).

    `index` is the row's position in the stream, used in error messages. `rng` draws l1 target lengths (pass
    `row_rng(seed, epoch, index)` so that resumed runs redraw the same ones). `check_answer` runs math-verify on
    the gold (a few milliseconds per row). Raises RowError.
    """
    row = _map_columns(entry, raw_row, index)
    problem_label, problem = _problem(row)
    out: dict[str, Any] = {"problem": problem, **_gold(row, problem_label)}
    if check_answer:
        _check_gold(row, out["solution"])
    for dst in row.source_of:
        if dst not in ("problem", "answer", "solution"):
            out[dst] = row.canon[dst]
    if entry.target_length_range is not None:
        if rng is None:
            raise ValueError(
                f"dataset {entry.name!r} is an l1 variant: pass rng=row_rng(seed, epoch, index)."
            )
        low, high = entry.target_length_range
        out["target_length"] = rng.randint(low, high)  # both ends inclusive, as in Tina's random.randint
    return out


@dataclass
class _Row:
    """One row being normalized, with what every rule and error message needs of it."""

    entry: DatasetEntry
    raw: dict[str, Any]
    index: int | None
    canon: dict[str, Any]
    """The row after the column mapping: mapped columns under their new names, renamed ones gone."""
    source_of: dict[str, str]
    """Our column -> the source column/path it came from."""

    def label(self, column: str) -> str:
        """The name a user knows `column` by: the source it was mapped from, else itself."""
        return self.source_of.get(column, column)

    def error(self, column: str, kind: RowErrorKind, reason: str, fix: str) -> RowError:
        """A RowError about this row."""
        return RowError(self.entry, self.index, column, kind, reason, fix, list(self.raw))

    def text(self, column: str, what: str) -> str:
        """The value of `column` (after mapping) as non-empty text; `what` names it in errors."""
        return _as_text(self.entry, self.canon[column], self.index, self.label(column), what, self.raw)


def _map_columns(entry: DatasetEntry, raw_row: dict[str, Any], index: int | None) -> _Row:
    """Apply the entry's column mapping, so that the rules below read every column under our names."""
    canon = dict(raw_row)
    source_of: dict[str, str] = {}
    for src, dst in entry.columns.items():
        try:
            canon[dst] = get_path(raw_row, src)
        except KeyError as err:
            raise RowError(
                entry,
                index,
                src,
                "missing_column",
                f"the mapped source is missing ({err.args[0]})",
                f"correct or remove the mapping `{src}: {dst}`",
                list(raw_row),
            ) from None
        source_of[dst] = src
    for dst, src in source_of.items():  # a renamed column is not also read under its old name
        if src != dst and src in canon and src not in source_of:
            del canon[src]
    return _Row(entry, raw_row, index, canon, source_of)


def _problem(row: _Row) -> tuple[str, str]:
    """(the problem column's label, the problem text): the mapped column, else the first alias the row has."""
    entry = row.entry
    problem_col = (
        "problem"
        if "problem" in row.source_of
        else next((a for a in entry.problem_aliases if a in row.canon), None)
    )
    if problem_col is None:
        fix = _suggest(row.raw, _PROBLEM_HINTS, "problem", set(row.source_of.values()))
        raise row.error(
            "problem", "missing_column", f"no problem column (looked for {list(entry.problem_aliases)})", fix
        )
    return row.label(problem_col), row.text(problem_col, "problem")


def _gold(row: _Row, problem_label: str) -> dict[str, Any]:
    """{"solution": the gold, maybe "solution_archive": the worked solution}, by the rules of the module
    docstring (`problem_label` is kept out of the mapping suggested when the row has no answer)."""
    canon = row.canon
    tina_col = _tina_gold_column(row.entry, canon)
    if tina_col == "solution":
        return {"solution": row.text("solution", "solution")}
    if "answer" in canon:  # with `gold: tina` the answer is wrapped untouched
        text = row.text("answer", "answer")
        out = {"solution": f"${text}$" if tina_col == "answer" else wrap_math(text)}
        if canon.get("solution") is not None:
            out["solution_archive"] = canon["solution"]
        return out
    if "solution" in canon:
        return _gold_from_solution(row)
    fix = _suggest(row.raw, _ANSWER_HINTS, "answer", set(row.source_of.values()) | {problem_label})
    raise row.error(
        "answer", "missing_column", "no answer column (looked for 'answer', then 'solution')", fix
    )


def _gold_from_solution(row: _Row) -> dict[str, Any]:
    """The gold of a row with a "solution" column and no answer: its last \\boxed{...}, or a short bare answer."""
    label = row.label("solution")
    text = row.text("solution", "solution")
    boxed = last_boxed(text)
    if boxed:
        return {"solution": wrap_math(boxed), "solution_archive": text}
    if "\n" not in text.strip() and len(text) <= _BARE_ANSWER_MAX_CHARS:
        return {"solution": wrap_math(text)}
    raise row.error(
        label,
        "unparseable",
        "it looks like a worked solution without \\boxed{}, so there is no final answer to check",
        _suggest(row.raw, _ANSWER_HINTS, "answer", {label}),
    )


def _check_gold(row: _Row, solution: str) -> None:
    """Refuse a gold from which math-verify extracts nothing: no completion could be graded against it."""
    if answer_parse_status(solution) == "none":
        col = row.source_of.get(
            "answer", "answer" if "answer" in row.canon else row.source_of.get("solution", "solution")
        )
        raise row.error(
            col,
            "unparseable",
            f"math-verify extracts no answer from {solution!r}",
            "fix the answer text, or map the column that holds the final answer to `answer`",
        )


def _tina_gold_column(entry: DatasetEntry, canon: dict[str, Any]) -> str | None:
    """With `gold: tina`, the column Tina's script made the gold ("solution" or "answer"); None otherwise or when
    the row has neither (the caller then reports the missing column)."""
    if entry.gold != "tina":
        return None
    order = ("answer", "solution") if entry.tina_gold == "answer" else ("solution", "answer")
    return next((c for c in order if c in canon), None)


def validate_head(
    entry: DatasetEntry, raw_rows: Sequence[dict[str, Any]], *, check_answer: bool = True
) -> None:
    """Start-up check: every one of the first rows must normalize. Raises DataValidationError with one message
    naming the dataset, the first bad row, its column and the fix, and how many of the head rows fail."""
    if not raw_rows:
        raise DataValidationError(
            f"dataset {entry.describe()} yields no rows; check the split and the files.", []
        )
    errors: list[RowError] = []
    for i, raw in enumerate(raw_rows):
        try:
            normalize(entry, raw, rng=random.Random(i), index=i, check_answer=check_answer)
        except RowError as err:
            errors.append(err)
    if errors:
        first = errors[0]
        more = (
            f" ({len(errors)} of the first {len(raw_rows)} rows fail; the first is shown)"
            if len(errors) > 1
            else ""
        )
        raise DataValidationError(f"{first}{more}", errors)
