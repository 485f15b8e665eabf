"""The mini-Tina task: chained integer arithmetic solved step by step, then a boxed answer.

A problem nests 3-4 operations left to right, e.g. ``Compute ((7+8)*3)-5.``; every intermediate value stays in
[0, 99]. The reference completion is one line per operation followed by the boxed result::

    <think>
    7+8=15
    15*3=45
    45-5=40
    </think>
    \\boxed{40}

Rows follow Tina's convention: ``solution`` is the gold answer as ``$<int>$`` (the accuracy reward parses it with
math-verify) and ``answer`` the bare integer. The train/held-out split is a stable sha256 hash of the problem text, so
the two never overlap whatever seeds generate them.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import NamedTuple

MAX_VALUE = 99
"""Every intermediate value lies in [0, MAX_VALUE], so each step result has at most two digits."""
MAX_ADDEND = 9
"""Largest operand of + and -."""
MAX_FACTOR = 5
"""Largest operand of * (the smallest is 2)."""
MIN_STEPS, MAX_STEPS = 3, 4
"""Number of chained operations per problem, drawn uniformly from this range."""
HELDOUT_PERCENT = 10
"""Share of all problems (by hash bucket, out of 100) reserved for evaluation."""
MAX_ERROR_DELTA = 2
"""A wrong step result is off by 1..MAX_ERROR_DELTA (either sign) from the right one."""


class Step(NamedTuple):
    """One operation of a problem: ``left op operand = result``."""

    op: str  # "+", "-" or "*"
    operand: int


def _apply(value: int, step: Step) -> int:
    """Result of one step: ``value op operand``."""
    if step.op == "+":
        return value + step.operand
    if step.op == "-":
        return value - step.operand
    return value * step.operand


def _sample_step(rng: random.Random, value: int) -> Step:
    """Draw one operation that keeps the running value inside [0, MAX_VALUE]."""
    ops = []
    if value + 1 <= MAX_VALUE:
        ops.append("+")
    if value >= 1:
        ops.append("-")
    if value >= 2 and value * 2 <= MAX_VALUE:
        ops.append("*")
    op = rng.choice(ops)
    if op == "+":
        return Step(op, rng.randint(1, min(MAX_ADDEND, MAX_VALUE - value)))
    if op == "-":
        return Step(op, rng.randint(1, min(MAX_ADDEND, value)))
    return Step(op, rng.randint(2, min(MAX_FACTOR, MAX_VALUE // value)))


def render_problem(start: int, steps: list[Step]) -> str:
    """The problem text: the operations nested left to right, e.g. ``Compute ((7+8)*3)-5.``."""
    expr = str(start)
    for i, step in enumerate(steps):
        expr = f"{expr}{step.op}{step.operand}"
        if i < len(steps) - 1:
            expr = f"({expr})"
    return f"Compute {expr}."


def parse_problem(problem: str) -> tuple[int, list[Step]]:
    """Inverse of :func:`render_problem`: the start value and the steps of a problem text."""
    if not (problem.startswith("Compute ") and problem.endswith(".")):
        raise ValueError(f"not a tiny-task problem (expected 'Compute <expr>.'): {problem!r}")
    expr = problem[len("Compute ") : -1].replace("(", "").replace(")", "")
    tokens: list[str] = []
    number = ""
    for ch in expr:
        if ch.isdigit():
            number += ch
        elif ch in "+-*" and number:
            tokens += [number, ch]
            number = ""
        else:
            raise ValueError(f"unexpected character {ch!r} in tiny-task problem {problem!r}")
    tokens.append(number)
    steps = [Step(tokens[i], int(tokens[i + 1])) for i in range(1, len(tokens) - 1, 2)]
    return int(tokens[0]), steps


def make_row(rng: random.Random) -> dict[str, str]:
    """One problem row ``{"problem", "solution", "answer"}`` drawn with ``rng`` (held-out or not)."""
    value = rng.randint(1, 20)
    start = value
    steps = []
    for _ in range(rng.randint(MIN_STEPS, MAX_STEPS)):
        step = _sample_step(rng, value)
        value = _apply(value, step)
        steps.append(step)
    return {"problem": render_problem(start, steps), "solution": f"${value}$", "answer": str(value)}


def is_heldout(problem: str) -> bool:
    """Whether a problem belongs to the held-out split: ``int(sha256(problem)[:8], 16) % 100 < HELDOUT_PERCENT``."""
    bucket = int(hashlib.sha256(problem.encode("utf-8")).hexdigest()[:8], 16) % 100
    return bucket < HELDOUT_PERCENT


def train_rows(seed: int) -> Iterator[dict[str, str]]:
    """An endless, seeded stream of non-held-out rows (problems may repeat: the space is finite)."""
    rng = random.Random(seed)
    while True:
        row = make_row(rng)
        if not is_heldout(row["problem"]):
            yield row


def heldout_rows(n: int = 256, seed: int = 1234) -> list[dict[str, str]]:
    """``n`` distinct held-out rows, deterministic in ``(n, seed)``."""
    if n < 1:
        raise ValueError(f"heldout_rows: n must be >= 1, got {n}")
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for _ in range(2000 * n):  # about one draw in ten is held out; the bound only guards against a tiny space
        row = make_row(rng)
        if is_heldout(row["problem"]) and row["problem"] not in seen:
            seen.add(row["problem"])
            rows.append(row)
            if len(rows) == n:
                return rows
    raise ValueError(f"heldout_rows: could not find {n} distinct held-out problems; ask for fewer")


def _wrong(value: int, rng: random.Random) -> int:
    """A nearby wrong value: ``value ± d`` with ``1 <= d <= MAX_ERROR_DELTA``, never going below ``min(0, value)``."""
    floor = min(0, value)  # an earlier error can make a later value negative
    choices = [
        value + d for d in range(-MAX_ERROR_DELTA, MAX_ERROR_DELTA + 1) if d != 0 and value + d >= floor
    ]
    return rng.choice(choices)


def reference_completion(row: dict[str, str], rng: random.Random, error_rate: float = 0.0) -> str:
    """The step-by-step completion of ``row`` in the model's output format.

    With probability ``error_rate`` per step the step's result is replaced by a nearby wrong value; later steps
    compute from that wrong value, so the boxed answer is wrong too (a consistent but mistaken trace).
    """
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"reference_completion: error_rate must be in [0, 1], got {error_rate}")
    value, steps = parse_problem(row["problem"])
    lines = []
    for step in steps:
        result = _apply(value, step)
        if rng.random() < error_rate:
            result = _wrong(result, rng)
        lines.append(f"{value}{step.op}{step.operand}={result}")
        value = result
    return "<think>\n" + "\n".join(lines) + "\n</think>\n\\boxed{" + str(value) + "}"
