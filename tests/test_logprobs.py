"""Completion log-probs: the shared-prompt path equals full sequences, in values and in LoRA gradients."""

import functools
from pathlib import Path

import pytest
import torch

from lightning_tina import logprobs
from lightning_tina.logprobs import completion_logprobs
from lightning_tina.policy import LoRASettings, load_causal_lm, wrap_lora

TINY = str(Path(__file__).resolve().parents[1] / "data" / "tiny")
G, B, P, C = 4, 3, 20, 16


@pytest.fixture(scope="module")
def policy() -> torch.nn.Module:
    torch.manual_seed(0)
    model = wrap_lora(load_causal_lm(TINY), LoRASettings(r=8, alpha=32, dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; random B makes the adapter change every layer's output
            p.data.normal_(0, 0.05)
    return model.train()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """B prompts x G completions, group-major, with left-padded prompts and right-padded completions."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 200, (B, P + C), generator=g).repeat_interleave(G, 0)  # [N, P+C]
    ids[:, P:] = torch.randint(3, 200, (B * G, C), generator=g)  # each row its own completion
    mask = torch.ones_like(ids)  # [N, P+C]
    for rows, pad in ((slice(0, 4), 5), (slice(4, 8), 2)):  # groups 0 and 1 have shorter prompts
        ids[rows, :pad], mask[rows, :pad] = 0, 0
    ids[1, -3:], mask[1, -3:] = 0, 0  # a completion that stopped 3 tokens early
    return ids, mask


def _run(policy: torch.nn.Module, share: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    ids, mask = _batch()
    policy.zero_grad()
    lp, ent = completion_logprobs(policy, ids, mask, C, G, temperature=0.7, share_prompt=share)  # [N, C] each
    (lp * mask[:, P:]).sum().backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return lp.detach() * mask[:, P:], ent * mask[:, P:], grads


def test_shared_prompt_equals_full_sequences_in_values_and_gradients(policy, monkeypatch):
    calls = []
    shared = logprobs._shared_prompt_hidden
    monkeypatch.setattr(logprobs, "_shared_prompt_hidden", lambda *a: calls.append(1) or shared(*a))
    full_lp, full_ent, full_grads = _run(policy, share=False)
    assert not calls
    lp, ent, grads = _run(policy, share=True)
    assert calls, "the shared-prompt path did not run"
    torch.testing.assert_close(lp, full_lp, rtol=0, atol=5e-5)
    torch.testing.assert_close(ent, full_ent, rtol=0, atol=5e-5)
    assert grads.keys() == full_grads.keys() and grads
    for name, g in full_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item())
    assert any(g.abs().max() > 0 for n, g in grads.items() if "layers.0." in n)  # reached the first layer


@pytest.mark.parametrize("share", [True, False])
def test_logprobs_equal_the_models_own_logits(policy, share):
    """Against an oracle that shares no code with logprobs.py: the causal LM's full logits, log-softmaxed."""
    ids, mask = _batch()
    with torch.no_grad():
        lp, ent = completion_logprobs(policy, ids, mask, C, G, temperature=0.7, share_prompt=share)  # [N, C]
        logits = policy(input_ids=ids, attention_mask=mask, position_ids=logprobs._positions(mask)).logits
        logp = torch.log_softmax(
            logits[:, P - 1 : -1].float() / 0.7, -1
        )  # [N, C, V]: position t predicts t + 1
        want = logp.gather(-1, ids[:, P:].unsqueeze(-1)).squeeze(-1)  # [N, C]
    m = mask[:, P:].bool()
    torch.testing.assert_close(lp[m], want[m], rtol=0, atol=5e-5)
    torch.testing.assert_close(ent[m], -(logp.exp() * logp).sum(-1)[m], rtol=0, atol=5e-5)


@pytest.mark.parametrize("c", [1, 2])
def test_the_shortest_completions(policy, c):
    ids, mask = _batch()
    ids, mask = ids[:, : P + c], mask[:, : P + c].clone()
    mask[:, P:] = 1
    with torch.no_grad():
        shared, _ = completion_logprobs(policy, ids, mask, c, G, share_prompt=True)
        full, _ = completion_logprobs(policy, ids, mask, c, G, share_prompt=False)
    assert shared.shape == full.shape == (ids.shape[0], c)
    torch.testing.assert_close(shared, full, rtol=0, atol=5e-5)


@pytest.mark.parametrize(
    "case",
    ["groups_differ", "misaligned_rows", "group_of_one"],
)
def test_falls_back_to_full_sequences_when_rows_do_not_form_groups(policy, monkeypatch, case):
    calls = []
    monkeypatch.setattr(logprobs, "_shared_prompt_hidden", lambda *a: calls.append(1))
    ids, mask = _batch()
    g = G
    if case == "groups_differ":
        ids[1, P - 1] += 1  # one row of group 0 has another prompt
    elif case == "misaligned_rows":
        ids, mask = ids[1:-1], mask[1:-1]  # a micro-batch that starts inside a group: 10 rows
        g = 5  # divides 10, yet the rows of each 5 do not share a prompt
    else:
        g = 1
    with torch.no_grad():
        lp, _ = completion_logprobs(policy, ids, mask, C, g)
    assert not calls and lp.shape == (ids.shape[0], C)


def test_gradient_checkpointing_in_training_uses_full_sequences(monkeypatch):
    model = wrap_lora(load_causal_lm(TINY), LoRASettings(r=4, alpha=8, dropout=0.0))
    model.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model.train()
    calls = []
    shared = logprobs._shared_prompt_hidden
    monkeypatch.setattr(logprobs, "_shared_prompt_hidden", lambda *a: calls.append(1) or shared(*a))
    ids, mask = _batch()
    completion_logprobs(model, ids, mask, C, G)[
        0
    ].sum().backward()  # checkpointed layers would drop the cache
    assert not calls
    with torch.no_grad():  # the reference / old-policy passes keep sharing
        completion_logprobs(model.eval(), ids, mask, C, G)
    assert calls == [1]


def test_trim_unused_columns_drops_padding_that_every_row_has():
    ids = torch.arange(2 * 9).view(2, 9)  # [2, P=4 + C=5]
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 0, 0]])
    t_ids, t_mask, c = logprobs.trim_unused_columns(ids, mask, 5, multiple=1)
    assert c == 3  # the longest completion: 3 tokens
    torch.testing.assert_close(t_ids, ids[:, 1:7])  # one leading column (padding in both rows) dropped
    torch.testing.assert_close(t_mask, mask[:, 1:7])
    # widths rounded up to a multiple: prompt 3 -> 4 (all of P), completion 3 -> 4
    t_ids, _, c = logprobs.trim_unused_columns(ids, mask, 5, multiple=2)
    assert c == 4 and torch.equal(t_ids, ids[:, :8])
    assert (
        logprobs.trim_unused_columns(ids, mask, 5)[0] is ids
    )  # the default multiple (64) keeps everything here
    full = torch.ones_like(mask)
    assert (
        logprobs.trim_unused_columns(ids, full, 5, multiple=1)[0] is ids
    )  # nothing to drop: the same tensors
    empty = mask.clone()
    empty[:, 4:] = 0  # no completion tokens at all: one column is kept
    assert logprobs.trim_unused_columns(ids, empty, 5, multiple=1)[2] == 1
    no_prompt = full.clone()
    no_prompt[:, :4] = 0  # all-padding prompt columns: the last prompt column is kept
    assert logprobs.trim_unused_columns(ids, no_prompt, 5, multiple=1)[0].shape == (2, 6)


def _short_group() -> tuple[torch.Tensor, torch.Tensor]:
    """One group (a Tina micro-batch) padded to the step's lengths: every row has 3 prompt-padding columns and a
    completion at least 5 tokens shorter than C."""
    ids, mask = _batch()
    ids, mask = ids[:G].clone(), mask[:G].clone()  # group 0: 5 padding columns on the left
    for row, length in enumerate([4, C - 5, 9, 1]):
        ids[row, P + length :], mask[row, P + length :] = 0, 0
    return ids, mask


@pytest.mark.parametrize("share", [True, False])
def test_trimmed_pass_equals_the_padded_pass_in_values_and_gradients(policy, monkeypatch, share):
    widths = []
    full_hidden = logprobs._full_hidden
    monkeypatch.setattr(  # exact widths: the default rounds them up to multiples of 64 columns
        logprobs, "trim_unused_columns", functools.partial(logprobs.trim_unused_columns, multiple=1)
    )
    monkeypatch.setattr(
        logprobs,
        "_full_hidden",
        lambda m, b, ids, *a: widths.append(ids.shape[1]) or full_hidden(m, b, ids, *a),
    )
    ids, mask = _short_group()
    out = {}
    for trim in (False, True):
        policy.zero_grad()
        lp, ent = completion_logprobs(policy, ids, mask, C, G, 0.7, share_prompt=share, trim_padding=trim)
        assert lp.shape == ent.shape == (G, C)
        (lp * mask[:, P:]).sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        out[trim] = (lp.detach(), ent.detach(), grads)
    m = mask[:, P:].bool()
    torch.testing.assert_close(out[True][0][m], out[False][0][m], rtol=0, atol=5e-5)
    torch.testing.assert_close(out[True][1][m], out[False][1][m], rtol=0, atol=5e-5)
    assert (out[True][0][:, C - 5 :] == 0).all() and (out[True][1][:, C - 5 :] == 0).all()  # cut-off columns
    for name, g in out[False][2].items():
        torch.testing.assert_close(out[True][2][name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item())
    if not share:  # the padded pass got P + C columns, the trimmed one (P - 5) + (C - 5)
        assert widths == [P + C, P + C - 10]
