"""Rollout tensors: whole groups reordered by length keep every field aligned."""

from pathlib import Path

import torch
from transformers import AutoTokenizer

from lightning_tina.rollout.batch import make_rollouts, order_groups_by_length
from lightning_tina.types import Generation, PromptBatch

TINY = str(Path(__file__).resolve().parents[1] / "data" / "tiny")


def _rollouts(lengths: list[list[int]]):
    """One prompt per group (prompt i has i + 2 tokens); completion j of group i has lengths[i][j] tokens."""
    tok = AutoTokenizer.from_pretrained(TINY)
    g = len(lengths[0])
    prompts = [[10 + i] * (i + 2) for i in range(len(lengths))]
    gens = [
        Generation(
            token_ids=[20 + 10 * i + j] * n,
            logprobs=[-0.1 * (i + 1)] * n,
            finish_reason="length" if n > 4 else "stop",
        )
        for i, group in enumerate(lengths)
        for j, n in enumerate(group)
    ]
    rows = [{"problem": f"p{i}", "solution": str(i)} for i in range(len(lengths))]
    return make_rollouts(PromptBatch(prompt_ids=prompts, rows=rows), gens, g, tok)


def test_groups_are_ordered_by_their_longest_completion_with_every_field_alike():
    r = _rollouts([[2, 3], [5, 1], [4, 4]])  # longest per group: 3, 5, 4
    o = order_groups_by_length(r, 2)
    order = [2, 3, 4, 5, 0, 1]  # groups 1, 2, 0
    for name in ("input_ids", "attention_mask", "completion_mask", "truncated", "engine_logprobs"):
        torch.testing.assert_close(getattr(o, name), getattr(r, name)[order], msg=name)
    assert o.completions == [r.completions[i] for i in order]
    assert [row["problem"] for row in o.rows] == ["p1", "p1", "p2", "p2", "p0", "p0"]
    assert o.completion_mask.sum(-1).tolist() == [5, 1, 4, 4, 2, 3]


def test_ties_keep_their_order_and_sorted_rollouts_come_back_unchanged():
    r = _rollouts([[4, 1], [2, 4], [3, 3]])  # longest: 4, 4, 3
    assert order_groups_by_length(r, 2) is r
