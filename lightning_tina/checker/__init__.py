"""The one answer checker shared by training rewards and benchmark evaluation.

``check``/``check_many`` extract the final answer of a completion and decide whether it equals the gold answer
with math-verify, in one of Tina's three grading modes:

* ``"expr"``: the gold is an answer string (AIME, AMC: ``"025"``, ``"-1"``);
* ``"latex"``: the gold is LaTeX, usually a whole reference solution whose last ``\\boxed{}`` holds the answer
  (MATH-500, Minerva), or ``"$40$"`` as in Tina's training data;
* ``"letter"``: the gold is a multiple-choice letter (GPQA), ``"A"``..``"D"``.

``strict=False`` reproduces Tina's lighteval grading (quirks included, see ``grade.py`` and grading.md);
``strict=True`` fixes the quirks and is what training rewards use by default. ``grader="tina_accuracy"`` /
``"tina_length"`` reproduce the math-verify calls of Tina's training reward functions (its accuracy reward; its
length, L1 and cosine rewards), for the Tina recipes. Every check runs in a worker process with a hard
wall-clock limit (``pool.py``), so it also works off the main thread and never hangs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

from lightning_tina.checker.grade import GRADERS
from lightning_tina.checker.pool import available_cores, get_pool

GradingMode = Literal["expr", "latex", "letter"]
Grader = Literal["strict", "lighteval", "tina_accuracy", "tina_length"]
Status = Literal["ok", "no_answer", "gold_unparsed", "timeout", "error"]
GRADING_MODES: tuple[str, ...] = get_args(GradingMode)
# check_many uses one process per core from this many distinct checks; below it, one process. Measured on the
# shared 2-core machine (bench/README_rewards.md): 2 processes won 1.1-1.3x from 64 up, and were noise below.
PARALLEL_MIN_BATCH = 64


class Verdict(NamedTuple):
    """The checker's decision on one completion."""

    correct: bool
    extracted: (
        str | None
    )  # the predicted final answer as extracted (None if nothing found), cut to 1000 chars
    status: str  # "ok" | "no_answer" | "gold_unparsed" | "timeout" | "error" (the last two are scored wrong)


def validate_grading(mode: str, timeout_s: float, letters: str = "ABCD", grader: str | None = None) -> None:
    """Refuse an unknown grading mode or grader, a non-positive time limit or bad choice letters (one message each);
    shared by the checker's entry points and the reward functions' kwargs checks."""
    if grader is not None and grader not in GRADERS:
        raise ValueError(f"grader={grader!r} is not one of {list(GRADERS)}")
    if mode not in GRADING_MODES:
        raise ValueError(f"grading mode={mode!r} is not one of {list(GRADING_MODES)}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s!r} must be a positive number of seconds")
    if not letters or not letters.isalpha() or not letters.isupper():
        raise ValueError(f"letters={letters!r} must be capital choice letters such as 'ABCD'")


def check(
    completion: str,
    gold: str,
    mode: GradingMode = "expr",
    *,
    strict: bool = True,
    timeout_s: float = 5.0,
    letters: str = "ABCD",
    grader: Grader | None = None,
) -> Verdict:
    """Grade one completion against one gold answer; at most ``timeout_s`` seconds of checking (then "timeout")."""
    return check_many(
        [completion], [gold], mode, strict=strict, timeout_s=timeout_s, letters=letters, grader=grader
    )[0]


def check_many(
    completions: Sequence[str],
    golds: Sequence[str],
    mode: GradingMode = "expr",
    *,
    strict: bool = True,
    timeout_s: float = 5.0,
    workers: int | None = None,
    letters: str = "ABCD",
    grader: Grader | None = None,
) -> list[Verdict]:
    """Grade ``completions[i]`` against ``golds[i]`` for every i.

    ``grader`` (one of ``GRADERS``) overrides ``strict`` when given: None means "strict" if ``strict`` else
    "lighteval". The "tina_*" graders ignore ``mode`` and ``letters``.

    Identical (completion, gold) pairs are graded once. ``workers=None`` uses one process below
    ``PARALLEL_MIN_BATCH`` distinct checks and one per available core above it; each check has its own
    ``timeout_s`` limit (measured from when a worker starts it).
    """
    validate_grading(mode, timeout_s, letters, grader)
    how = grader or ("strict" if strict else "lighteval")
    if len(completions) != len(golds):
        raise ValueError(f"check_many got {len(completions)} completions but {len(golds)} golds")
    for name, seq in (("completions", completions), ("golds", golds)):
        bad = next((i for i, x in enumerate(seq) if not isinstance(x, str)), None)
        if bad is not None:
            raise TypeError(f"{name}[{bad}] is {type(seq[bad]).__name__}, expected str")
    slots: dict[tuple[str, str], int] = {}
    for c, g in zip(completions, golds, strict=True):
        slots.setdefault((c, g), len(slots))
    jobs = [(c, g, mode, how, letters) for (c, g) in slots]
    if workers is None:
        workers = 1 if len(jobs) < PARALLEL_MIN_BATCH else available_cores()
    if workers < 1:
        raise ValueError(f"workers={workers} must be at least 1 (or None for automatic)")
    results = get_pool().run(jobs, timeout_s=timeout_s, workers=workers)
    return [Verdict(*results[slots[(c, g)]]) for c, g in zip(completions, golds, strict=True)]


__all__ = [
    "GRADERS",
    "GRADING_MODES",
    "Grader",
    "GradingMode",
    "Verdict",
    "check",
    "check_many",
    "validate_grading",
]
