"""The checker on the real benchmark files in ../shared/benchmarks (skipped where they are absent).

Fast tests parse every 10th gold and grade every 20th reference solution of the large files (all rows of
AIME/AMC); ``-m slow`` runs the full sweeps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lightning_tina.checker import check_many
from lightning_tina.checker.extract import loose_string_key
from lightning_tina.checker.grade import parse_gold

BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
PARSE_STRIDE = 10  # fast tests: every 10th gold of MATH-500, Minerva and OlympiadBench
GRADE_STRIDE = 20  # fast tests: every 20th reference solution of MATH-500 and Minerva

# benchmark -> (gold field, grading mode, required strict parse rate)
GOLDS = {
    "aime24": ("answer", "expr", 1.0),
    "aime25": ("answer", "expr", 1.0),
    "amc23": ("answer", "expr", 1.0),
    "math500": ("solution", "latex", 1.0),
    "minerva_math": ("solution", "latex", 0.99),
    "olympiadbench": ("answer", "latex", 0.99),
}
# Golds the strict checker cannot read as math, and why (measured on the full files).
KNOWN_UNPARSED = {
    "olympiadbench-1965": "prose: '$f(x)=a x+b$, where $b$ is an arbitrary integer, and $a$ ... with $\\mho(a)=0$'",
    "olympiadbench-2045": "'$t(0,4]$' is not a well-formed expression",
}


def load(name: str) -> list[dict[str, Any]]:
    """Rows of ``<name>.jsonl``, or skip the test when the offline benchmark copies are not beside the repo."""
    path = BENCHMARKS / f"{name}.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not found: the offline benchmark copies (../shared/benchmarks) are absent")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def subset(rows: list[Any], full: bool, stride: int) -> list[Any]:
    return rows if full or len(rows) <= 100 else rows[::stride]


def gold_failures(name: str, full: bool) -> tuple[int, list[str]]:
    field, mode, _ = GOLDS[name]
    rows = subset(load(name), full, PARSE_STRIDE)
    return len(rows), [r["id"] for r in rows if not parse_gold(r[field], mode, strict=True)]


@pytest.mark.parametrize("name", list(GOLDS))
def test_gold_answers_parse_subset(name: str) -> None:
    _, failed = gold_failures(name, full=False)
    assert set(failed) <= set(KNOWN_UNPARSED), (
        f"{name}: unexpected unparsed golds {sorted(set(failed) - set(KNOWN_UNPARSED))}"
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GOLDS))
def test_gold_answers_parse_full(name: str) -> None:
    n, failed = gold_failures(name, full=True)
    rate = 1 - len(failed) / n
    print(f"{name}: {n - len(failed)}/{n} golds parse ({rate:.2%}); failures: {failed}")
    assert rate >= GOLDS[name][2], f"{name}: parse rate {rate:.2%}, failures {failed}"
    assert set(failed) <= set(KNOWN_UNPARSED)


def self_consistency(name: str, strict: bool, full: bool) -> tuple[float, float, list[str], list[str]]:
    """Each reference solution graded against its own gold, and against the next row's different gold.

    Returns (own-gold correct rate, other-gold wrong rate, ids missed, ids wrongly credited).
    """
    rows = load(name)
    picked = subset(list(range(len(rows))), full, GRADE_STRIDE)
    others = [(i, (i + 1) % len(rows)) for i in picked]
    others = [
        (i, j)
        for i, j in others
        if loose_string_key(rows[i]["answer"]) != loose_string_key(rows[j]["answer"])
    ]
    sols = [r["solution"] for r in rows]
    completions = [sols[i] for i in picked] + [sols[i] for i, _ in others]
    golds = [sols[i] for i in picked] + [sols[j] for _, j in others]
    verdicts = check_many(completions, golds, "latex", strict=strict, timeout_s=10.0)
    own, cross = verdicts[: len(picked)], verdicts[len(picked) :]
    missed = [rows[i]["id"] for i, v in zip(picked, own, strict=True) if not v.correct]
    credited = [rows[i]["id"] for (i, _), v in zip(others, cross, strict=True) if v.correct]
    return 1 - len(missed) / len(own), 1 - len(credited) / len(cross), missed, credited


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "tina"])
@pytest.mark.parametrize("name", ["math500", "minerva_math"])
def test_reference_solutions_grade_right_and_cross_wrong_subset(name: str, strict: bool) -> None:
    own, cross, missed, credited = self_consistency(name, strict, full=False)
    assert own >= 0.99, f"{name}: own-gold misses {missed}"
    assert cross >= 0.995 or len(credited) <= 1, f"{name}: credited against another answer: {credited}"


@pytest.mark.slow
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "tina"])
@pytest.mark.parametrize("name", ["math500", "minerva_math"])
def test_reference_solutions_grade_right_and_cross_wrong_full(name: str, strict: bool) -> None:
    own, cross, missed, credited = self_consistency(name, strict, full=True)
    print(
        f"{name} strict={strict}: own {own:.2%} (missed {missed}); cross wrong {cross:.2%} (credited {credited})"
    )
    assert own >= 0.99
    assert cross >= 0.995
