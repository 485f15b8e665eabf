"""Verdicts shared within one scope (one training step), and that scope's count of checker timeouts.

Several reward functions may grade the same completion against the same gold (accuracy, cosine, length ...).
Inside ``with verdict_scope() as scope:`` every ``answer_verdicts`` call reuses verdicts already computed in the
scope, and ``scope.timeouts`` counts the checks that ran out of time (each distinct check once).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

from lightning_tina.checker import Grader, GradingMode, Verdict, check_many


class VerdictScope:
    """Verdicts and timeout count of one scope."""

    def __init__(self) -> None:
        self.cache: dict[tuple[str, str, str, str], Verdict] = {}
        self.timeouts = 0  # distinct checks in this scope that hit their time limit


_SCOPE: ContextVar[VerdictScope | None] = ContextVar("lightning_tina_verdict_scope", default=None)


@contextmanager
def verdict_scope() -> Iterator[VerdictScope]:
    """Open a scope (nested scopes are independent; the outer one resumes afterwards)."""
    scope = VerdictScope()
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


def answer_verdicts(
    completions: Sequence[str],
    golds: Sequence[str],
    *,
    mode: GradingMode,
    strict: bool = True,
    timeout_s: float,
    grader: Grader | None = None,
) -> list[Verdict]:
    """``check_many``, reusing verdicts already computed in the current scope and counting its timeouts.

    ``grader`` overrides ``strict`` as in ``check_many``.
    """
    how: Grader = grader or ("strict" if strict else "lighteval")
    scope = _SCOPE.get()
    if scope is None:
        return check_many(completions, golds, mode, timeout_s=timeout_s, grader=how)
    keys = [(c, g, mode, how) for c, g in zip(completions, golds, strict=True)]
    todo = list(dict.fromkeys(k for k in keys if k not in scope.cache))
    if todo:
        fresh = check_many([k[0] for k in todo], [k[1] for k in todo], mode, timeout_s=timeout_s, grader=how)
        scope.timeouts += sum(v.status == "timeout" for v in fresh)
        scope.cache.update(zip(todo, fresh, strict=True))
    return [scope.cache[k] for k in keys]
