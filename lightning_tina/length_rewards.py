"""Tina's length rewards: values relative to the other completions of the same group (or of the whole call).

Each function grades every completion of its call in one batched checker call, then normalizes lengths within
blocks of ``group_size`` consecutive completions (completions are group-major, so a block is one prompt's
group), or over the whole call when ``group_size`` is None. ``RewardSet`` passes ``group_size`` according to the
reward's ``scope``; see ``RewardSpec.scope`` for which one Tina used. Lengths are characters, as in Tina.
``grading="tina"`` grades answers with the math-verify calls Tina's length rewards made (shared with its cosine
reward); a row whose gold does not parse counts as correct, as in Tina.

``soft_overlong`` (DAPO's soft overlong punishment) is the exception: it reads completion lengths in tokens, from
the ``completion_ids`` column that GRPOModule adds to every reward call, and needs no group.
"""

from __future__ import annotations

from typing import Any

from lightning_tina.reward_columns import correctness, is_correct_or_unparsed, numbers


def blocks(n: int, group_size: int | None, reward: str) -> list[range]:
    """The row ranges normalized together: consecutive groups of ``group_size`` rows, or all ``n`` rows."""
    if group_size is None:
        return [range(n)] if n else []
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"reward {reward!r}: group_size={group_size!r} must be a positive integer or None")
    if n % group_size:
        raise ValueError(
            f"reward {reward!r}: {n} completions do not split into groups of group_size={group_size}"
        )
    return [range(s, s + group_size) for s in range(0, n, group_size)]


def _spans(lengths: list[int], parts: list[range]) -> list[tuple[int, int]]:
    """(min, max) length of each row's block, repeated per row: ``[N]`` pairs."""
    spans: list[tuple[int, int]] = []
    for part in parts:
        block = [lengths[i] for i in part]
        spans.extend([(min(block), max(block))] * len(part))
    return spans


def length_reward(
    completions: list[str],
    *,
    group_size: int | None = None,
    gold_field: str = "solution",
    mode: str = "latex",
    grading: str = "strict",
    timeout_s: float = 5.0,
    **columns: Any,
) -> list[float | None]:
    """Kimi 1.5 length reward, min/max taken within each block (one group, or the whole call).

    ``lam = 0.5 - (len - min_len) / (max_len - min_len)``; correct: ``lam``, wrong: ``min(0, lam)``;
    all 0.0 in a block where every completion has the same length.
    """
    verdicts = correctness(completions, columns, "length", gold_field, mode, grading, timeout_s)
    lengths = [len(c) for c in completions]
    spans = _spans(lengths, blocks(len(completions), group_size, "length"))
    rewards: list[float | None] = []
    for n, (lo, hi), ok in zip(lengths, spans, is_correct_or_unparsed(verdicts), strict=True):
        if hi == lo:
            rewards.append(0.0)
            continue
        lam = 0.5 - (n - lo) / (hi - lo)
        rewards.append(lam if ok else min(0.0, lam))
    return rewards


def length_l1_exact_reward(
    completions: list[str],
    *,
    group_size: int | None = None,
    alpha: float = 0.0003,
    target_field: str = "target_length",
    gold_field: str = "solution",
    mode: str = "latex",
    grading: str = "strict",
    timeout_s: float = 5.0,
    **columns: Any,
) -> list[float | None]:
    """L1-Exact: correct ``1 - alpha*|len - target|``, wrong ``-alpha*|len - target|`` (per-row target).

    As in Tina, all rewards of a block are 0.0 when every completion in it has the same length.
    """
    rewards: list[float | None] = []
    for n, t, same, ok in _targeted_rows(
        "length_l1_exact",
        completions,
        columns,
        group_size,
        target_field,
        gold_field,
        mode,
        grading,
        timeout_s,
    ):
        gap = alpha * abs(n - t)
        rewards.append(0.0 if same else (1.0 - gap if ok else -gap))
    return rewards


def length_l1_max_reward(
    completions: list[str],
    *,
    group_size: int | None = None,
    alpha: float = 0.0003,
    delta: float = 0.5,
    target_field: str = "target_length",
    gold_field: str = "solution",
    mode: str = "latex",
    grading: str = "strict",
    timeout_s: float = 5.0,
    **columns: Any,
) -> list[float | None]:
    """L1-Max: correct ``clip(alpha*(target - len) + delta, 0, 1)``, wrong 0.0 (per-row target).

    As in Tina, all rewards of a block are 0.0 when every completion in it has the same length.
    """
    rewards: list[float | None] = []
    for n, t, same, ok in _targeted_rows(
        "length_l1_max", completions, columns, group_size, target_field, gold_field, mode, grading, timeout_s
    ):
        value = max(0.0, min(alpha * (t - n) + delta, 1.0))
        rewards.append(value if ok and not same else 0.0)
    return rewards


def _targeted_rows(
    name: str,
    completions: list[str],
    columns: dict[str, Any],
    group_size: int | None,
    target_field: str,
    gold_field: str,
    mode: str,
    grading: str,
    timeout_s: float,
) -> list[tuple[int, float, bool, bool]]:
    """Per completion of an L1 reward: (length, target, all lengths of its block equal, correct or unparsed)."""
    verdicts = correctness(completions, columns, name, gold_field, mode, grading, timeout_s)
    targets = numbers(columns, target_field, name, len(completions))
    lengths = [len(c) for c in completions]
    spans = _spans(lengths, blocks(len(completions), group_size, name))
    oks = is_correct_or_unparsed(verdicts)
    return [(n, t, lo == hi, ok) for n, t, (lo, hi), ok in zip(lengths, targets, spans, oks, strict=True)]


def soft_overlong_reward(
    completions: list[str],
    *,
    max_completion_length: int | None = None,
    buffer_length: int | None = None,
    penalty: float = 1.0,
    **columns: Any,
) -> list[float | None]:
    """DAPO's soft overlong punishment: 0 up to the last ``buffer_length`` tokens of the budget, then linear to -penalty.

    With L = len(completion_ids) in tokens (EOS included), L_max = ``max_completion_length`` and L_buf =
    ``buffer_length`` (default L_max // 5, DAPO's 4096 of 20480): ``r = -penalty * clip((L - (L_max - L_buf)) /
    L_buf, 0, 1)``, i.e. 0 for L <= L_max - L_buf, -penalty at L >= L_max. L_max must be the rollout budget,
    ``rollout.sampling.max_new_tokens``; this reward cannot see it, so it is a required kwarg.
    """
    if max_completion_length is None:
        raise ValueError(
            "reward 'soft_overlong' needs kwargs.max_completion_length: set it to rollout.sampling.max_new_tokens"
        )
    if (
        isinstance(max_completion_length, bool)
        or not isinstance(max_completion_length, int)
        or max_completion_length < 1
    ):
        raise ValueError(
            f"max_completion_length={max_completion_length!r} must be a positive number of tokens"
        )
    buf = max_completion_length // 5 if buffer_length is None else buffer_length
    if isinstance(buf, bool) or not isinstance(buf, int) or not 1 <= buf <= max_completion_length:
        raise ValueError(
            f"buffer_length={buf!r} must be a number of tokens in [1, max_completion_length={max_completion_length}]"
        )
    if not penalty >= 0:
        raise ValueError(f"penalty={penalty!r} must be >= 0 (the reward is -penalty at the budget)")
    if not completions:
        return []
    if "completion_ids" not in columns:
        raise KeyError(
            "reward 'soft_overlong' reads completion lengths in tokens from the 'completion_ids' column, which "
            "GRPOModule passes to every reward call; called by hand, pass completion_ids=[...]"
        )
    ids = columns["completion_ids"]
    if len(ids) != len(completions):
        raise ValueError(
            f"reward 'soft_overlong': {len(ids)} completion_ids for {len(completions)} completions"
        )
    start = max_completion_length - buf
    return [-penalty * min(max((len(t) - start) / buf, 0.0), 1.0) for t in ids]
