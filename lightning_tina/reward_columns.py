"""What reward functions read from their call: dataset-row columns and answer verdicts (shared checker cache).

Used by ``lightning_tina.rewards`` and ``lightning_tina.length_rewards``; kept apart so that neither imports the
other's registry at import time.
"""

from __future__ import annotations

from typing import Any

from lightning_tina.checker import Grader, Verdict, validate_grading
from lightning_tina.checker.scope import answer_verdicts

REWARD_GRADINGS: tuple[str, ...] = ("strict", "lighteval", "tina")
"""Values of a grading reward's ``grading`` kwarg. "strict" (default): the checker's strict mode, the better
training signal. "lighteval": Tina's evaluation grading (``strict=False``). "tina": the math-verify calls of
Tina's own reward function of the same name (tina/post_train_hf/rewards.py), quirks included: what the Tina
recipes select so that they train on Tina's reward values."""


def column(columns: dict[str, Any], name: str, reward: str, n: int) -> list[Any]:
    """The row field ``name`` as a list of ``n`` values (one per completion); a clear error when absent."""
    if n == 0:
        return []
    if name not in columns:
        raise KeyError(f"reward {reward!r} reads the row field {name!r}, but the rows have {sorted(columns)}")
    values = columns[name]
    if len(values) != n:
        raise ValueError(f"reward {reward!r}: field {name!r} has {len(values)} values for {n} completions")
    return list(values)


def numbers(columns: dict[str, Any], name: str, reward: str, n: int) -> list[float]:
    """The row field ``name`` as floats; refuses booleans and non-numbers."""
    values = column(columns, name, reward, n)
    bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))), None)
    if bad is not None:
        raise ValueError(f"reward {reward!r}: field {name!r} must hold numbers, got {bad!r}")
    return [float(v) for v in values]


def check_grading(mode: str, timeout_s: float, grading: str = "strict") -> None:
    """Refuse an unknown grading mode or ``grading`` value, or a non-positive checker time limit."""
    if grading not in REWARD_GRADINGS:
        hint = " (the `strict: bool` kwarg became `grading`)" if isinstance(grading, bool) else ""
        raise ValueError(f"grading={grading!r} is not one of {list(REWARD_GRADINGS)}{hint}")
    validate_grading(mode, timeout_s)


def correctness(
    completions: list[str],
    columns: dict[str, Any],
    reward: str,
    gold_field: str,
    mode: str,
    grading: str,
    timeout_s: float,
) -> list[Verdict]:
    """One checker verdict per completion against its row's ``gold_field``, in one batched checker call.

    ``grading="tina"`` grades as Tina's reward function did: its accuracy reward's math-verify calls for
    ``reward="accuracy"``, the calls its length, L1 and cosine rewards share for every other reward.
    """
    check_grading(mode, timeout_s, grading)
    # A missing gold (None) must read as "no gold" (reward None), not as the text "None".
    golds = ["" if g is None else str(g) for g in column(columns, gold_field, reward, len(completions))]
    return answer_verdicts(
        completions, golds, mode=mode, timeout_s=timeout_s, grader=grader_for(reward, grading)
    )


def grader_for(reward: str, grading: str) -> Grader:
    """The checker grader that reward ``reward`` uses under ``grading`` (see ``REWARD_GRADINGS``)."""
    if grading == "tina":
        return "tina_accuracy" if reward == "accuracy" else "tina_length"
    return "strict" if grading == "strict" else "lighteval"


def is_correct_or_unparsed(verdicts: list[Verdict]) -> list[bool]:
    """Tina's length rewards treat an unparseable gold as correct ("to avoid penalizing")."""
    return [v.correct or v.status == "gold_unparsed" for v in verdicts]
