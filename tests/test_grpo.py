"""The GRPO maths against hand-computed values."""

import math

import pytest
import torch

from lightning_tina import grpo
from lightning_tina.optim import warmup_cosine_factor


def test_group_advantages_group_std():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4
    a = grpo.group_advantages(r, 4, "group", eps=0.0)
    std = math.sqrt(((0.75**2) + 3 * (0.25**2)) / 3)  # unbiased std of [1, 0, 0, 0]
    assert torch.allclose(a[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / std)
    assert torch.equal(a[4:], torch.zeros(4))  # equal rewards in a group: zero advantage, no NaN


def test_group_advantages_batch_and_none():
    r = torch.tensor([1.0, 0.0, 3.0, 1.0])
    none = grpo.group_advantages(r, 2, "none")
    assert torch.allclose(none, torch.tensor([0.5, -0.5, 1.0, -1.0]))
    batch = grpo.group_advantages(r, 2, "batch", eps=0.0)
    assert torch.allclose(batch, none / r.std())


def test_group_advantages_all_equal_is_zero_with_eps():
    a = grpo.group_advantages(torch.ones(8), 4)
    assert torch.equal(a, torch.zeros(8))


def test_group_advantages_rejects_ragged_batch():
    with pytest.raises(ValueError, match="group_size=3"):
        grpo.group_advantages(torch.ones(8), 3)


def test_clipped_surrogate_unclipped_and_both_clip_directions():
    old = torch.zeros(1, 4)
    # ratios: 1.0, 1.5 (above 1+0.2), 0.5 (below 1-0.2), 1.1
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.1]]))
    pos, cl, ch = grpo.clipped_surrogate(logp, old, torch.tensor([2.0]), 0.2, 0.2)
    # A > 0: loss = -min(r A, clip(r) A) = -A * min(r, clip(r))
    assert torch.allclose(pos, -2.0 * torch.tensor([[1.0, 1.2, 0.5, 1.1]]))
    assert ch.tolist() == [[False, True, False, False]] and not cl.any()
    neg, cl, ch = grpo.clipped_surrogate(logp, old, torch.tensor([-1.0]), 0.2, 0.2)
    # A < 0: loss = -min(-r, -clip(r)) = max(r, clip(r))
    assert torch.allclose(neg, torch.tensor([[1.0, 1.5, 0.8, 1.1]]))
    assert cl.tolist() == [[False, False, True, False]] and not ch.any()


def test_clipped_surrogate_asymmetric_epsilons():
    logp = torch.log(torch.tensor([[1.25, 0.75]]))
    loss, _, ch = grpo.clipped_surrogate(logp, torch.zeros(1, 2), torch.tensor([1.0]), 0.2, 0.28)
    assert torch.allclose(loss, torch.tensor([[-1.25, -0.75]]))  # 1.25 < 1.28 is not clipped
    assert not ch.any()


def test_clipped_surrogate_gradient_vanishes_when_clipped():
    logp = torch.log(torch.tensor([[1.5, 1.0]])).requires_grad_()
    loss, _, _ = grpo.clipped_surrogate(logp, torch.zeros(1, 2), torch.tensor([1.0]))
    loss.sum().backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == -1.0


def test_k3_kl():
    logp = torch.tensor([0.0, -1.0])
    ref = torch.tensor([0.0, -2.0])
    assert torch.allclose(grpo.k3_kl(logp, ref), torch.tensor([0.0, math.exp(-1) + 1 - 1]))


LOSS = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])


@pytest.mark.parametrize(
    "loss_type, kwargs, expected",
    [
        ("grpo", {}, (2.0 + 4.0) / 2),  # per-sequence means 2 and 4
        ("bnpo", {}, 10.0 / 4),  # token mean
        ("dr_grpo", {"max_completion_length": 5}, 10.0 / (2 * 5)),
        (
            "dapo",
            {"num_tokens": 8},
            10.0 / 8,
        ),  # tokens of the whole step (here: other micro-batches had 4 more)
    ],
)
def test_aggregate_loss_modes(loss_type, kwargs, expected):
    assert grpo.aggregate_loss(LOSS, MASK, loss_type, **kwargs).item() == pytest.approx(expected)


def test_aggregate_loss_micro_batches_sum_to_full_batch():
    for loss_type, kw in [
        ("grpo", {}),
        ("dr_grpo", {"max_completion_length": 4}),
        ("dapo", {"num_tokens": 4}),
    ]:
        full = grpo.aggregate_loss(LOSS, MASK, loss_type, **kw)
        parts = sum(
            grpo.aggregate_loss(LOSS[i : i + 1], MASK[i : i + 1], loss_type, num_sequences=2, **kw)
            for i in (0, 1)
        )
        assert parts.item() == pytest.approx(full.item()), loss_type


def test_aggregate_loss_unknown_mode():
    with pytest.raises(ValueError, match="loss_type"):
        grpo.aggregate_loss(LOSS, MASK, "sum")  # type: ignore[arg-type]


def test_token_logprobs_chunked_equals_full_forward_and_backward():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 8, requires_grad=True)  # [N, C, H]
    weight = torch.randn(11, 8, requires_grad=True)  # [V, H]
    targets = torch.randint(0, 11, (3, 5))  # [N, C]
    full = torch.log_softmax((hidden @ weight.T) / 0.7, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    g_full = torch.autograd.grad(full.sum(), (hidden, weight))
    for chunk in (1, 3, 5, 7, 100):  # pieces of a row, whole rows, everything at once
        lp, ent = grpo.token_logprobs(hidden, targets, weight, None, temperature=0.7, chunk_tokens=chunk)
        assert torch.allclose(lp, full, atol=1e-6), chunk
        g = torch.autograd.grad(lp.sum(), (hidden, weight))
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g, g_full, strict=True)), chunk
        p = torch.softmax((hidden @ weight.T) / 0.7, -1)
        assert torch.allclose(ent, -(p * p.log()).sum(-1), atol=1e-5)


def _autograd_logprobs(hidden, targets, weight, bias, temperature):
    """The plain autograd version over the full [N, C, V] logits, as token_logprobs' reference."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature  # [N, C, V]
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def test_token_logprobs_hand_written_backward_matches_autograd_with_bias_and_trainable_head():
    torch.manual_seed(1)
    hidden = torch.randn(4, 6, 16, dtype=torch.float64, requires_grad=True)  # [N, C, H]
    weight = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)  # [V, H]
    bias = torch.randn(23, dtype=torch.float64, requires_grad=True)  # [V]
    targets = torch.randint(0, 23, (4, 6))  # [N, C]
    upstream = torch.randn(4, 6, dtype=torch.float64)  # [N, C]: a loss that weighs tokens differently
    ref_lp, ref_ent = _autograd_logprobs(hidden, targets, weight, bias, 1.3)
    ref_grads = torch.autograd.grad((ref_lp * upstream).sum(), (hidden, weight, bias))
    for chunk in (5, 6, 12, 1000):
        lp, ent = grpo.token_logprobs(hidden, targets, weight, bias, temperature=1.3, chunk_tokens=chunk)
        assert not ent.requires_grad
        torch.testing.assert_close(lp, ref_lp.float(), check_dtype=False, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ent, ref_ent.float(), check_dtype=False, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad((lp * upstream).sum(), (hidden, weight, bias))
        for got, want, name in zip(grads, ref_grads, ("hidden", "weight", "bias"), strict=True):
            assert got.dtype == want.dtype, name
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
    lp_only, none = grpo.token_logprobs(
        hidden, targets, weight, bias, 1.3, chunk_tokens=1000, with_entropy=False
    )
    assert none is None and torch.equal(lp_only, lp)


def test_token_logprobs_under_bf16_autocast_matches_autograd_and_frozen_head_gets_no_grad():
    torch.manual_seed(2)
    hidden = torch.randn(
        2, 9, 32, requires_grad=True
    )  # [N, C, H] float32, as with float32 weights + autocast
    weight = torch.randn(50, 32) / 32**0.5  # [V, H], frozen as under LoRA
    targets = torch.randint(0, 50, (2, 9))  # [N, C]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_lp, _ = _autograd_logprobs(hidden, targets, weight, None, 1.0)
        (ref_g,) = torch.autograd.grad(ref_lp.sum(), hidden)
        lp, _ = grpo.token_logprobs(hidden, targets, weight, None, chunk_tokens=4)
    (g,) = torch.autograd.grad(lp.sum(), hidden)  # the backward runs outside autocast, as Lightning's does
    assert g.dtype == torch.float32 and weight.grad is None
    torch.testing.assert_close(lp, ref_lp, atol=1e-6, rtol=0)  # the same bf16 matmul, then float32
    torch.testing.assert_close(g, ref_g, atol=2e-2, rtol=2e-2)  # both backward matmuls run in bf16
    assert (g - ref_g).abs().max() < 0.02 * ref_g.abs().max()


def test_truncated_importance_weights_cap():
    w = grpo.truncated_importance_weights(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0]), cap=2.0)
    assert torch.allclose(w, torch.tensor([1.0, 2.0]))


def test_warmup_cosine_schedule():
    # 10 steps, warmup 1 step, min ratio 0.1: 0 at step 0, peak at 1, min at the last step
    assert warmup_cosine_factor(0, 10, 0.1, 0.1) == 0.0
    assert warmup_cosine_factor(1, 10, 0.1, 0.1) == pytest.approx(1.0)
    assert warmup_cosine_factor(10, 10, 0.1, 0.1) == pytest.approx(0.1)
    mid = warmup_cosine_factor(1 + 9 // 2, 10, 0.1, 0.1)
    assert 0.1 < mid < 1.0
    assert warmup_cosine_factor(0, 10, 0.0, 0.1) == pytest.approx(1.0)
