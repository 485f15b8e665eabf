"""Tina's reward functions (hand-computed values) and RewardSet (weights, None, timeouts, scope, config errors)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_tina.rewards import (
    R1_BOXED_FORMAT_PATTERN,
    RewardSet,
    RewardSpec,
    accuracy_reward,
    cosine_reward,
    format_reward,
    length_l1_exact_reward,
    length_l1_max_reward,
    length_reward,
    reasoning_steps_reward,
    register_reward,
    repetition_penalty_reward,
    tag_count_reward,
)

TINY_ROW = {"problem": "What is (7+8)*3-5?", "solution": "$40$", "answer": "40"}
TINY = "<think>\n7+8=15\n15*3=45\n45-5=40\n</think>\n\\boxed{40}"
RIGHT10 = "\\boxed{40}"  # 10 characters, correct for TINY_ROW
WRONG10 = "\\boxed{41}"
TOWER = "\\boxed{10^{10^{10^{10}}}}"
FIXTURES = Path(__file__).parent / "fixtures" / "checker"


def cols(n: int, **extra: Any) -> dict[str, list[Any]]:
    """TRL-style columns of n copies of the tiny row."""
    return {k: [v] * n for k, v in (TINY_ROW | extra).items()}


def test_accuracy_on_the_tiny_task_shape() -> None:
    assert accuracy_reward([TINY, WRONG10, "no answer"], **cols(3)) == [1.0, 0.0, 0.0]
    assert accuracy_reward([TINY], **cols(1, solution="")) == [None]  # unparseable gold: not applicable
    assert accuracy_reward([TINY], gold_field="answer", mode="expr", **cols(1)) == [1.0]
    with pytest.raises(KeyError, match="'target'"):
        accuracy_reward([TINY], gold_field="target", **cols(1))


def test_format_default_is_tinas_rule_and_r1_pattern_is_configurable() -> None:
    twice = "a\n</think>\nb\n</think>\n\\boxed{1}"
    assert format_reward([TINY, "no tags \\boxed{40}", twice, "x\n</think>\n"]) == [1.0, 0.0, 0.0, 1.0]
    r1 = dict(pattern=R1_BOXED_FORMAT_PATTERN, match="search")
    no_box = "<think>\nx\n</think>\nThe answer is 40."
    box_in_think = "<think>\n\\boxed{1}\n</think>\nso 40"
    assert format_reward([TINY, "x\n</think>\nhence \\boxed{2}", no_box, box_in_think], **r1) == [
        1.0,
        1.0,
        0.0,
        0.0,
    ]
    assert format_reward(["abc", "abcd"], pattern="abc", match="full") == [1.0, 0.0]
    with pytest.raises(ValueError, match="match="):
        format_reward(["x"], match="exact")


def test_tag_count_and_reasoning_steps() -> None:
    assert tag_count_reward([TINY, "<think>\nx", "x\n</think>\n", ""]) == [1.0, 0.5, 0.5, 0.0]
    steps = reasoning_steps_reward(
        ["Step 1: a Step 2: b", "First, x. Second, y. Next, z. Finally, w.", "1. a\n2. b"]
    )
    assert steps == pytest.approx([2 / 3, 1.0, 1 / 3])  # "^\d+\." only matches at the very start, as in Tina


def test_length_reward_kimi_formula() -> None:
    comps = [RIGHT10, WRONG10 + " " * 5, "x" * 20 + RIGHT10, WRONG10 + " " * 15]  # lengths 10, 15, 30, 25
    # lam = 0.5 - (len - 10) / 20 -> 0.5, 0.25, -0.5, -0.25; wrong answers get min(0, lam)
    assert length_reward(comps, **cols(4)) == pytest.approx([0.5, 0.0, -0.5, -0.25])
    assert length_reward([RIGHT10, WRONG10], **cols(2)) == [0.0, 0.0]  # equal lengths
    assert length_reward([RIGHT10, WRONG10 + "  "], **cols(2, solution="")) == [
        0.5,
        -0.5,
    ]  # bad gold = correct


def test_l1_rewards_read_a_per_row_target_length() -> None:
    comps = [RIGHT10, WRONG10 + " " * 10]  # lengths 10 and 20
    exact = length_l1_exact_reward(comps, **cols(2), target_length=[100, 50])
    assert exact == pytest.approx([1 - 0.0003 * 90, -0.0003 * 30])
    capped = length_l1_max_reward([RIGHT10, RIGHT10 + " " * 4000], **cols(2), target_length=[100, 100])
    assert capped == pytest.approx([0.5 + 0.0003 * 90, 0.0])  # clip(alpha*(target-len)+delta, 0, 1)
    assert length_l1_max_reward(comps, **cols(2), target_length=[100, 100]) == pytest.approx([0.527, 0.0])
    with pytest.raises(KeyError, match="target_length"):
        length_l1_exact_reward(comps, **cols(2))
    with pytest.raises(ValueError, match="must hold numbers"):
        length_l1_max_reward(comps, **cols(2), target_length=["long", "short"])


def test_cosine_reward_anchor_points() -> None:
    half, full, double = RIGHT10, RIGHT10 + " " * 10, RIGHT10 + " " * 30  # progress 0.5, 1, 2 at max_len=20
    assert cosine_reward([half, full, double], max_len=20, **cols(3)) == pytest.approx([0.75, 0.5, 1.0])
    assert cosine_reward([double], max_len=20, clip_progress=True, **cols(1)) == pytest.approx([0.5])
    wrong = [WRONG10, WRONG10 + " " * 10]  # wrong: from min_value_wrong=0.0 (short) to max_value_wrong=-0.5
    assert cosine_reward(wrong, max_len=20, **cols(2)) == pytest.approx([-0.25, -0.5])
    assert cosine_reward([WRONG10], **cols(1, solution="")) == [1.0]  # Tina: unparseable gold gives 1.0


def test_repetition_penalty() -> None:
    out = repetition_penalty_reward(["a b c a b c", "a b c d", "", "a b"], ngram_size=3, max_penalty=-1.0)
    assert out == pytest.approx([-0.25, 0.0, 0.0, 0.0])  # 4 trigrams, 3 distinct -> (1 - 3/4) * -1


def test_reward_set_weights_none_and_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))
    rs = RewardSet(
        [
            RewardSpec("accuracy", weight=2.0),
            RewardSpec("format", weight=1.0),
            RewardSpec("user_rewards:brevity", weight=0.5, kwargs={"limit": 10}),
        ]
    )
    rows = [TINY_ROW | {"skip": False}, TINY_ROW | {"skip": True}, TINY_ROW | {"skip": False, "solution": ""}]
    out = rs([TINY, WRONG10, RIGHT10], rows)
    nan = float("nan")
    expected = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, nan], [nan, 0.0, 1.0]])
    assert torch.equal(out.per_function.isnan(), expected.isnan())
    assert torch.allclose(out.per_function.nan_to_num(), expected.nan_to_num())
    assert out.total.tolist() == pytest.approx([3.0, 0.0, 0.5])  # None terms are skipped
    assert out.none_fraction.tolist() == pytest.approx([1 / 3, 0.0, 1 / 3])
    assert out.timeouts == 0
    assert rs.names == ["accuracy", "format", "user_rewards:brevity"]
    logs = rs.metrics(out)
    assert logs["rewards/accuracy/mean"] == pytest.approx(0.5) and logs["rewards/checker_timeouts"] == 0.0


def test_checker_timeouts_are_counted_once_and_score_wrong() -> None:
    rs = RewardSet(
        [RewardSpec("accuracy", kwargs={"timeout_s": 1.0}), RewardSpec("cosine", kwargs={"timeout_s": 1.0})]
    )
    out = rs([TOWER, TINY], [TINY_ROW, TINY_ROW])
    assert out.timeouts == 1  # both functions share the one verdict
    assert out.per_function[0, 0].item() == 0.0 and out.per_function[1, 0].item() == 1.0


def test_registered_user_reward() -> None:
    @register_reward("test_rewards_half")
    def half(completions: list[str], **_: Any) -> list[float | None]:
        return [0.5] * len(completions)

    out = RewardSet([RewardSpec("test_rewards_half", weight=4.0)])(["a", "b"], [{}, {}])
    assert out.total.tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match="already registered"):
        register_reward("accuracy")(half)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            RewardSpec("acuracy"),
            r"model\.rewards\[1\]\.name = 'acuracy' is not a known reward.*'accuracy'.*pkg\.module:function",
        ),
        (RewardSpec("no_such_module:fn"), r"model\.rewards\[1\]\.name = 'no_such_module:fn': cannot import"),
        (RewardSpec("user_rewards:NOT_CALLABLE"), "is not callable"),
        (RewardSpec("cosine", kwargs={"max_lenn": 5}), r"model\.rewards\[1\]\.kwargs\.max_lenn.*max_len"),
        (RewardSpec("repetition_penalty", kwargs={"max_penalty": 1.0}), "must not be positive"),
        (RewardSpec("format", kwargs={"pattern": "("}), "not a valid regular expression"),
        (RewardSpec("accuracy", kwargs={"mode": "tex"}), "mode='tex'"),
        (RewardSpec("accuracy", weight=math.inf), "must be a finite number"),
        (RewardSpec("length", scope="prompt"), r"model\.rewards\[1\]\.scope = 'prompt' must be one of"),  # type: ignore[arg-type]
        (RewardSpec("length", kwargs={"group_size": 4}), r"model\.rewards\[1\]\.kwargs\.group_size"),
    ],
)
def test_config_errors_name_the_setting(
    spec: RewardSpec, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))
    with pytest.raises(ValueError, match=message):
        RewardSet([RewardSpec("format"), spec])


def test_call_errors() -> None:
    rs = RewardSet([RewardSpec("format", kwargs={"pattern": "x"})])
    with pytest.raises(ValueError, match="clash with dataset row fields"):
        rs(["x"], [{"pattern": "y"}])
    with pytest.raises(ValueError, match="2 completions but 1 rows"):
        rs(["a", "b"], [{}])
    with pytest.raises(ValueError, match="empty"):
        RewardSet([])


# ----------------------------------------------------------------------------------------------------------
# scope: which completions one call of a batch-relative reward sees

GROUPS = [RIGHT10, WRONG10 + " " * 10, RIGHT10 + " " * 20, WRONG10 + " " * 30]  # lengths 10, 20 | 30, 40


@pytest.mark.parametrize(
    ("fn", "extra", "comps"),
    [
        (length_reward, {}, GROUPS),
        # the l1 rewards depend on the call only through "all lengths equal -> 0": group 1 has equal lengths
        (length_l1_exact_reward, {"target_length": 15}, [RIGHT10, RIGHT10, RIGHT10, WRONG10 + " "]),
        (length_l1_max_reward, {"target_length": 15}, [RIGHT10, RIGHT10, RIGHT10, RIGHT10 + " "]),
    ],
)
def test_length_rewards_normalize_per_group(fn: Any, extra: dict[str, Any], comps: list[str]) -> None:
    columns = cols(4, **extra)
    alone = [v for g in (0, 2) for v in fn(comps[g : g + 2], **{k: v[g : g + 2] for k, v in columns.items()})]
    grouped = fn(comps, group_size=2, **columns)
    assert grouped == pytest.approx(alone)
    assert fn(comps, **columns) != pytest.approx(alone)  # one min/max over both groups differs
    with pytest.raises(ValueError, match="do not split into groups of group_size=3"):
        fn(comps, group_size=3, **columns)


def test_length_per_group_hand_values() -> None:
    # groups (10, 20) and (30, 40): each group's shortest gets 0.5 and its longest -0.5
    assert length_reward(GROUPS, group_size=2, **cols(4)) == pytest.approx([0.5, -0.5, 0.5, -0.5])
    # one min/max over the call: lam = 0.5 - (len - 10) / 30, wrong answers capped at 0
    assert length_reward(GROUPS, **cols(4)) == pytest.approx([0.5, 0.0, 0.5 - 20 / 30, -0.5])


def test_reward_set_scope_group_is_per_group_and_batch_is_whole_call() -> None:
    rows = [TINY_ROW] * 4
    by_group = RewardSet([RewardSpec("length")])(GROUPS, rows, group_size=2)
    by_batch = RewardSet([RewardSpec("length", scope="batch")])(GROUPS, rows, group_size=2)
    assert by_group.per_function[:, 0].tolist() == pytest.approx([0.5, -0.5, 0.5, -0.5])
    assert by_batch.per_function[:, 0].tolist() == pytest.approx(length_reward(GROUPS, **cols(4)))
    whole = RewardSet([RewardSpec("length")])(GROUPS, rows)  # no group_size: the call is one group
    assert torch.equal(whole.per_function, by_batch.per_function)
    with pytest.raises(ValueError, match="group_size=3"):
        RewardSet([RewardSpec("length")])(GROUPS, rows, group_size=3)


_CALLS: list[int] = []


@register_reward("test_rewards_relative")
def _relative(completions: list[str], **_: Any) -> list[float | None]:
    """Rank of each length within the call, scaled to [0, 1] (depends on the other completions)."""
    _CALLS.append(len(completions))
    lo, hi = min(map(len, completions)), max(map(len, completions))
    return [(len(c) - lo) / (hi - lo) for c in completions]


@register_reward("test_rewards_own_length", per_completion=True)
def _own_length(completions: list[str], **_: Any) -> list[float | None]:
    _CALLS.append(len(completions))
    return [float(len(c)) for c in completions]


def test_user_rewards_are_called_per_group_unless_per_completion() -> None:
    rows = [TINY_ROW] * 4
    _CALLS.clear()
    out = RewardSet([RewardSpec("test_rewards_relative")])(GROUPS, rows, group_size=2)
    assert _CALLS == [2, 2] and out.per_function[:, 0].tolist() == [0.0, 1.0, 0.0, 1.0]
    _CALLS.clear()
    out = RewardSet([RewardSpec("test_rewards_relative", scope="batch")])(GROUPS, rows, group_size=2)
    assert _CALLS == [4] and out.per_function[:, 0].tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    _CALLS.clear()
    out = RewardSet([RewardSpec("test_rewards_own_length")])(GROUPS, rows, group_size=2)
    assert _CALLS == [4] and out.per_function[:, 0].tolist() == [10.0, 20.0, 30.0, 40.0]


def test_per_completion_rewards_ignore_scope_and_share_one_checker_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lightning_tina.checker.scope as scope_module

    batches: list[int] = []
    real = scope_module.check_many

    def counting(completions: Any, golds: Any, *args: Any, **kwargs: Any) -> Any:
        batches.append(len(completions))
        return real(completions, golds, *args, **kwargs)

    names = ["accuracy", "format", "tag_count", "reasoning_steps", "cosine", "repetition_penalty", "length"]
    by_group = RewardSet([RewardSpec(n) for n in names])
    by_batch = RewardSet([RewardSpec(n, scope="batch") for n in names])
    comps = [TINY, WRONG10, RIGHT10 + " " * 7, "Step 1: x\n</think>\n\\boxed{40}"]
    rows = [TINY_ROW] * 4
    monkeypatch.setattr(scope_module, "check_many", counting)
    grouped = by_group(comps, rows, group_size=2)
    assert batches == [4]  # every grading reward, the length one included, shares one batched checker call
    whole = by_batch(comps, rows, group_size=2)
    per_completion = slice(0, len(names) - 1)
    assert torch.equal(grouped.per_function[:, per_completion], whole.per_function[:, per_completion])
    direct = [accuracy_reward(comps, **cols(4)), format_reward(comps), cosine_reward(comps, **cols(4))]
    assert torch.allclose(grouped.per_function[:, [0, 1, 4]].T, torch.tensor(direct))
