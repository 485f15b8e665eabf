"""Tina's GRPO reward functions (same semantics and parameters) and the weighted set the trainer calls.

A reward function is ``fn(completions: list[str], **columns) -> list[float | None]``: ``columns`` holds every
dataset-row field as a list aligned with ``completions`` (TRL style: ``solution=[...]``) plus the function's
``kwargs`` from the config; ``None`` means "does not apply to this row". Add one with ``@register_reward("name")``
or name it by import path (``"my_pkg.my_rewards:brevity"``) in YAML::

    rewards: [{name: accuracy, weight: 2.0}, {name: format, weight: 1.0, kwargs: {pattern: ...}}]

Besides the row fields, ``columns`` holds ``completion_ids`` (each completion's token ids, EOS included), which
GRPOModule passes to every call (``RewardSet(..., extra_columns=...)``); ``soft_overlong`` reads lengths from it.

Which completions one call holds is the reward's ``scope`` (``RewardSpec.scope``; Tina: one prompt's group). A
function with a ``group_size`` parameter gets the whole step in one call and normalizes per group itself (the
length rewards, so the checker stays batched); one registered with ``per_completion=True`` gets the whole step
in one call; any other is called once per group.

Functions that grade answers should call ``checker.scope.answer_verdicts``: it shares verdicts between functions
within one step and counts checker timeouts for the step's log. The grading ones (accuracy, cosine and the length
rewards) take ``grading``: "strict" (default, the better training signal), "lighteval" (Tina's evaluation
grading) or "tina" (the math-verify calls of Tina's reward function of the same name, quirks included; the Tina
recipes select it so that they train on Tina's values, see ``reward_columns.REWARD_GRADINGS``).
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, NamedTuple, get_args

import torch

from lightning_tina.checker.scope import verdict_scope
from lightning_tina.length_rewards import (
    length_l1_exact_reward,
    length_l1_max_reward,
    length_reward,
    soft_overlong_reward,
)
from lightning_tina.reward_columns import correctness

RewardFn = Callable[..., list[float | None]]
RewardScope = Literal["group", "batch"]
_REGISTRY: dict[str, RewardFn] = {}
_BUILTIN: set[str] = set()
_PER_COMPLETION: set[str] = set()  # registered names whose values depend only on their own completion and row

TINA_FORMAT_PATTERN = r"\n</think>\n"
"""Tina's ``format`` reward: exactly one ``"\\n</think>\\n"`` (``<think>`` itself is in the chat template)."""
R1_BOXED_FORMAT_PATTERN = r"\A(?:<think>\n)?(?:(?!</think>).)*\n</think>\n(?:(?!</think>).)*?\\boxed\{"
"""DeepSeek-R1 shape (use with ``match: search``): optional ``<think>``, reasoning, one ``</think>``, then a box."""
_STEP_PATTERN = re.compile(r"(Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,)")  # Tina's, verbatim


def register_reward(name: str, *, per_completion: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator that makes ``fn`` selectable as ``{name: <name>}`` in the ``rewards`` config.

    ``per_completion=True`` declares that each value depends only on its own completion and row, so the set
    calls ``fn`` once per step whatever the ``scope`` (the values are the same either way).
    """
    if not name or ":" in name:
        raise ValueError(
            f"reward name {name!r} must be non-empty and must not contain ':' (import-path syntax)"
        )

    def add(fn: RewardFn) -> RewardFn:
        old = _REGISTRY.get(name)
        if old is not None and _where(old) != _where(fn):  # re-registering it (a module reload) is fine
            raise ValueError(f"reward name {name!r} is already registered to {_where(old)}")
        _REGISTRY[name] = fn
        (_PER_COMPLETION.add if per_completion else _PER_COMPLETION.discard)(name)
        return fn

    return add


def _where(fn: RewardFn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _builtin(name: str, per_completion: bool = True) -> Callable[[RewardFn], RewardFn]:
    _BUILTIN.add(name)
    return register_reward(name, per_completion=per_completion)


# ----------------------------------------------------------------------------------------------------------
# Tina's reward functions


@_builtin("accuracy")
def accuracy_reward(
    completions: list[str],
    *,
    gold_field: str = "solution",
    mode: str = "latex",
    grading: str = "strict",
    timeout_s: float = 5.0,
    **columns: Any,
) -> list[float | None]:
    """1.0 if the final answer equals the row's gold (``gold_field``), else 0.0; None if the gold does not parse.

    Tina grades against ``solution`` (answers wrapped as ``$...$``), hence LaTeX mode. A checker timeout is 0.0.
    ``grading="tina"``: Tina's accuracy_reward exactly (boxed answers only, no repair of ``\\frac12``, gold
    parsed first-match, ``verify(gold, answer)``); ``mode`` does not apply then.
    """
    verdicts = correctness(completions, columns, "accuracy", gold_field, mode, grading, timeout_s)
    return [None if v.status == "gold_unparsed" else float(v.correct) for v in verdicts]


@_builtin("format")
def format_reward(
    completions: list[str], *, pattern: str = TINA_FORMAT_PATTERN, match: str = "once", **_: Any
) -> list[float | None]:
    """1.0 if the completion has the expected shape, else 0.0 (regex with DOTALL).

    ``match``: "once" = the pattern occurs exactly once (Tina's rule with the default pattern), "search" =
    somewhere, "full" = the whole completion.
    """
    regex = _compile(pattern)
    if match not in ("once", "search", "full"):
        raise ValueError(f"match={match!r} must be 'once', 'search' or 'full'")
    if match == "once":
        return [float(_occurs_once(regex, c)) for c in completions]
    test = regex.search if match == "search" else regex.fullmatch
    return [float(test(c) is not None) for c in completions]


def _occurs_once(regex: re.Pattern[str], text: str) -> bool:
    """Exactly one non-overlapping match (Tina: ``text.count("\\n</think>\\n") == 1``); stops at the second."""
    found = regex.finditer(text)
    return next(found, None) is not None and next(found, None) is None


@lru_cache(maxsize=32)
def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ValueError(f"pattern={pattern!r} is not a valid regular expression: {e}") from None


@_builtin("tag_count")
def tag_count_reward(completions: list[str], **_: Any) -> list[float | None]:
    """0.5 for exactly one ``"<think>\\n"`` plus 0.5 for exactly one ``"\\n</think>\\n"``."""
    return [0.5 * (c.count("<think>\n") == 1) + 0.5 * (c.count("\n</think>\n") == 1) for c in completions]


@_builtin("reasoning_steps")
def reasoning_steps_reward(completions: list[str], **_: Any) -> list[float | None]:
    """min(1, k / 3) for k step markers ("Step 1:", "1." at the very start, "\\n-", "\\n*", "First," ...)."""
    return [min(1.0, len(_STEP_PATTERN.findall(c)) / 3) for c in completions]


for _name, _fn in (
    ("length", length_reward),
    ("length_l1_exact", length_l1_exact_reward),
    ("length_l1_max", length_l1_max_reward),
):
    _builtin(_name, per_completion=False)(_fn)
del _name, _fn
_builtin("soft_overlong")(soft_overlong_reward)


@_builtin("cosine")
def cosine_reward(
    completions: list[str],
    *,
    min_value_wrong: float = 0.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    max_len: int = 1000,
    clip_progress: bool = False,
    gold_field: str = "solution",
    mode: str = "latex",
    grading: str = "strict",
    timeout_s: float = 5.0,
    **columns: Any,
) -> list[float | None]:
    """Cosine-scaled correctness: ``lo + (hi - lo) * (1 + cos(pi * len / max_len)) / 2`` (len in characters).

    Correct: lo, hi = min_value_correct, max_value_correct; wrong: lo, hi = max_value_wrong, min_value_wrong, so
    short right answers earn most and short wrong ones lose most. Defaults are Tina's config values. Tina does
    not clip ``len / max_len`` (past 2*max_len the reward rises again); ``clip_progress`` caps it at 1. A row
    whose gold does not parse gets 1.0, as in Tina. ``grading="tina"``: Tina's cosine reward's own math-verify
    calls (a box inside ``$...$`` is not unwrapped, ``verify(answer, gold)``).
    """
    if max_len <= 0:
        raise ValueError(f"max_len={max_len!r} must be a positive number of characters")
    verdicts = correctness(completions, columns, "cosine", gold_field, mode, grading, timeout_s)
    rewards: list[float | None] = []
    for text, v in zip(completions, verdicts, strict=True):
        if v.status == "gold_unparsed":
            rewards.append(1.0)
            continue
        progress = len(text) / max_len
        cosine = math.cos(math.pi * (min(progress, 1.0) if clip_progress else progress))
        lo, hi = (min_value_correct, max_value_correct) if v.correct else (max_value_wrong, min_value_wrong)
        rewards.append(lo + 0.5 * (hi - lo) * (1.0 + cosine))
    return rewards


@_builtin("repetition_penalty")
def repetition_penalty_reward(
    completions: list[str], *, ngram_size: int = 3, max_penalty: float = -1.0, **_: Any
) -> list[float | None]:
    """``max_penalty * (1 - distinct / total)`` over lower-cased word n-grams; 0.0 with fewer words than n."""
    if max_penalty > 0:
        raise ValueError(f"max_penalty={max_penalty!r} must not be positive (it is a penalty)")
    if not isinstance(ngram_size, int) or ngram_size < 1:
        raise ValueError(f"ngram_size={ngram_size!r} must be a positive integer")
    rewards: list[float | None] = []
    for text in completions:
        words = text.lower().split()
        if len(words) < ngram_size:
            rewards.append(0.0)
            continue
        grams = list(zip(*(words[i:] for i in range(ngram_size)), strict=False))
        rewards.append((1.0 - len(set(grams)) / len(grams)) * max_penalty)
    return rewards


# ----------------------------------------------------------------------------------------------------------
# The weighted set


@dataclass
class RewardSpec:
    """One entry of the ``rewards`` config list."""

    name: str
    """Registered reward name ("accuracy", "format", ...) or an import path "pkg.module:function"."""
    weight: float = 1.0
    """Multiplier of this function's value in the total reward (TRL ``reward_weights``)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword parameters of the function (e.g. ``{pattern: ..., match: search}`` for ``format``)."""
    scope: RewardScope = "group"
    """Which completions one call sees; it matters for rewards that compare a completion with the others of the
    call (``length``, ``length_l1_exact``, ``length_l1_max``: min/max length). "group" = the num_generations
    completions of one prompt; "batch" = all B*G completions of the rank's step. Tina used "group": every
    recipe sets per_device_train_batch_size == num_generations and its trainer's sampler repeats each prompt
    num_generations times in a row, so each reward call held exactly one prompt's group. Per-completion rewards
    (accuracy, format, cosine, ...) give the same values either way."""


class RewardOutput(NamedTuple):
    """Rewards of one step."""

    per_function: torch.Tensor  # [N, F] float32, NaN where a function returned None
    total: torch.Tensor  # [N] sum over F of weight * value, None (NaN) terms skipped
    timeouts: int  # checker timeouts during this call
    none_fraction: torch.Tensor  # [F] fraction of rows where each function returned None


def _resolve(name: str, where: str) -> RewardFn:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" not in name:
        raise ValueError(
            f"{where}.name = {name!r} is not a known reward; use one of {sorted(_REGISTRY)} "
            "or an import path 'pkg.module:function'"
        )
    module_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{where}.name = {name!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise ValueError(f"{where}.name = {name!r} is not callable")
    return fn


def _check_kwargs(fn: RewardFn, spec: RewardSpec, where: str) -> None:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a callable without a readable signature: checked when called
        return
    named = {p for p, v in params.items() if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)} - {
        "completions"
    }
    open_kwargs = any(v.kind is v.VAR_KEYWORD for v in params.values())
    for key in spec.kwargs:
        if key not in named and (spec.name in _BUILTIN or not open_kwargs):
            raise ValueError(
                f"{where}.kwargs.{key}: {spec.name!r} has no parameter {key!r}; it takes {sorted(named)}"
            )
    if spec.name in _BUILTIN:
        try:
            fn([], **spec.kwargs)  # a dry run on no completions checks the parameter values
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}.kwargs: {e}") from None


def _takes_group_size(fn: RewardFn) -> bool:
    """True if ``fn`` names a ``group_size`` parameter (it then normalizes within groups itself)."""
    try:
        return "group_size" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _check_group_size(group_size: int | None, n: int) -> None:
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"RewardSet: group_size={group_size!r} must be a positive integer (num_generations)")
    if n % group_size:
        raise ValueError(
            f"RewardSet: {n} completions do not split into groups of group_size={group_size}; pass "
            "model.grpo.num_generations and the step's group-major completions"
        )


class RewardSet:
    """The configured reward functions, their weights, and one call per training step."""

    def __init__(self, specs: Sequence[RewardSpec]) -> None:
        if not specs:
            raise ValueError("model.rewards is empty: configure at least one reward, e.g. [{name: accuracy}]")
        self.specs = list(specs)
        self.fns: list[RewardFn] = []
        for i, spec in enumerate(self.specs):
            where = f"model.rewards[{i}]"
            fn = _resolve(spec.name, where)
            if not isinstance(spec.weight, (int, float)) or not math.isfinite(spec.weight):
                raise ValueError(f"{where}.weight = {spec.weight!r} must be a finite number")
            if spec.scope not in get_args(RewardScope):
                raise ValueError(
                    f"{where}.scope = {spec.scope!r} must be one of {list(get_args(RewardScope))} "
                    "('group' is Tina's: one call per prompt's group of completions)"
                )
            if "group_size" in spec.kwargs:
                raise ValueError(
                    f"{where}.kwargs.group_size: set by the trainer from model.grpo.num_generations; "
                    "remove it (choose the normalization with scope: group | batch)"
                )
            _check_kwargs(fn, spec, where)
            self.fns.append(fn)
        self.names = [s.name for s in self.specs]
        # log keys: the name, with the list index added when a name is configured twice
        self.log_names = [n if self.names.count(n) == 1 else f"{n}_{j}" for j, n in enumerate(self.names)]
        self.weights = torch.tensor([float(s.weight) for s in self.specs], dtype=torch.float32)  # [F]
        self.takes_group_size = [_takes_group_size(fn) for fn in self.fns]
        self.per_completion = [s.name in _PER_COMPLETION for s in self.specs]

    def __call__(
        self,
        completions: list[str],
        rows: list[dict[str, Any]],
        group_size: int | None = None,
        extra_columns: dict[str, list[Any]] | None = None,
    ) -> RewardOutput:
        """Score N completions; ``rows[i]`` is the dataset row of ``completions[i]``.

        ``group_size``: completions per prompt (num_generations; completions are group-major, prompt i owns
        rows ``i*G .. i*G+G-1``). None: the whole call is one group. ``extra_columns``: columns of the rollout
        that are not dataset fields, N values each (GRPOModule passes ``completion_ids``, the token ids).
        """
        n = len(completions)
        if len(rows) != n:
            raise ValueError(f"RewardSet got {n} completions but {len(rows)} rows")
        _check_group_size(group_size, n)
        keys = list(dict.fromkeys(k for row in rows for k in row))
        reserved = {"completions", *(extra_columns or {})}
        if reserved & set(keys):
            raise ValueError(
                f"a dataset row has a field named {sorted(reserved & set(keys))}; rename it (reward functions "
                "receive the rollout's own columns under these names)"
            )
        columns = {k: [row.get(k) for row in rows] for k in keys}
        for k, values in (extra_columns or {}).items():
            if len(values) != n:
                raise ValueError(f"RewardSet got {len(values)} values of column {k!r} for {n} completions")
            columns[k] = list(values)
        values = torch.full((n, len(self.fns)), float("nan"), dtype=torch.float32)  # [N, F]
        with verdict_scope() as scope:
            for j, spec in enumerate(self.specs):
                clash = set(spec.kwargs) & set(columns)
                if self.takes_group_size[j] and "group_size" in columns:
                    clash.add("group_size")
                if clash:
                    raise ValueError(
                        f"model.rewards[{j}].kwargs {sorted(clash)} clash with dataset row fields"
                    )
                out = self._call(j, completions, columns, group_size if spec.scope == "group" else None)
                if len(out) != n:
                    raise ValueError(f"reward {spec.name!r} returned {len(out)} values for {n} completions")
                for i, v in enumerate(out):
                    if v is not None:
                        values[i, j] = float(v)
        total = (values * self.weights.unsqueeze(0)).nansum(dim=1)  # [N]
        none_fraction = values.isnan().float().mean(dim=0) if n else torch.zeros(len(self.fns))  # [F]
        return RewardOutput(values, total, scope.timeouts, none_fraction)

    def _call(
        self, j: int, completions: list[str], columns: dict[str, list[Any]], block: int | None
    ) -> list[float | None]:
        """Function j's values: one call that normalizes per ``block`` itself, one call, or one per block."""
        fn, spec, n = self.fns[j], self.specs[j], len(completions)
        if self.takes_group_size[j]:
            return list(fn(completions, **columns, **spec.kwargs, group_size=block))
        if block is None or block >= n or self.per_completion[j]:
            return list(fn(completions, **columns, **spec.kwargs))
        out: list[float | None] = []
        for start in range(0, n, block):
            part = slice(start, start + block)
            got = list(fn(completions[part], **{k: v[part] for k, v in columns.items()}, **spec.kwargs))
            if len(got) != block:
                raise ValueError(
                    f"reward {spec.name!r} returned {len(got)} values for a group of {block} completions"
                )
            out.extend(got)
        return out

    def metrics(self, output: RewardOutput) -> dict[str, float]:
        """What to log per step: each function's mean (over rows where it applies), None fraction, timeouts."""
        logs: dict[str, float] = {
            "rewards/total_mean": output.total.mean().item() if output.total.numel() else 0.0
        }
        for j, name in enumerate(self.log_names):
            logs[f"rewards/{name}/mean"] = output.per_function[:, j].nanmean().item()
            logs[f"rewards/{name}/none_fraction"] = output.none_fraction[j].item()
        logs["rewards/checker_timeouts"] = float(output.timeouts)
        return logs
