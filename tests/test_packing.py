"""Padding-free passes (lightning_tina/packing.py): the plan, and packed log-probs and LoRA gradients against the
padded pass of `logprobs.completion_logprobs`, in float32."""

from pathlib import Path

import pytest
import torch

from lightning_tina import packing
from lightning_tina.attention import CPU_ATTENTION, register_cpu_attention
from lightning_tina.logprobs import completion_logprobs
from lightning_tina.packing import flat_rows, plan_passes
from lightning_tina.policy import LoRASettings, load_causal_lm, wrap_lora

TINY = str(Path(__file__).resolve().parents[1] / "data" / "tiny")
G, B, P, C = 4, 3, 20, 24


def _policy(attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if attn == CPU_ATTENTION:
        register_cpu_attention()
    model = wrap_lora(load_causal_lm(TINY, "float32", attn), LoRASettings(r=8, alpha=32, dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; random B makes the adapter change every layer's output
            p.data.normal_(0, 0.05)
    return model.train()


@pytest.fixture(scope="module", params=[CPU_ATTENTION, "sdpa", "eager"])
def policy(request) -> torch.nn.Module:
    return _policy(request.param)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """B prompts x G completions, group-major: left-padded prompts, right-padded completions of uneven lengths
    (one empty, one of a single token)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 200, (B, P + C), generator=g).repeat_interleave(G, 0)  # [N, P+C]
    ids[:, P:] = torch.randint(3, 200, (B * G, C), generator=g)  # each row its own completion
    mask = torch.ones_like(ids)  # [N, P+C]
    for rows, pad in ((slice(0, 4), 5), (slice(4, 8), 2)):  # groups 0 and 1 have shorter prompts
        ids[rows, :pad], mask[rows, :pad] = 0, 0
    lengths = torch.tensor([24, 3, 17, 1, 9, 0, 24, 12, 5, 20, 2, 14])  # [N]
    cut = torch.arange(C) >= lengths[:, None]  # [N, C]
    ids[:, P:][cut], mask[:, P:][cut] = 0, 0
    return ids, mask


def _grads(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def _padded(policy: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor):
    policy.zero_grad()
    lp, ent = completion_logprobs(
        policy, ids, mask, C, G, temperature=0.7, share_prompt=False, trim_padding=False
    )  # [N, C] each
    (lp * mask[:, P:] * _weights(ids.shape[0])).sum().backward()
    return lp.detach() * mask[:, P:], ent * mask[:, P:], _grads(policy)


def _weights(n: int) -> torch.Tensor:
    """Per-token loss weights [N, C] that differ by row and column, so misplaced log-probs change the gradient."""
    return torch.linspace(0.5, 1.5, n * C).view(n, C)


def _packed(policy: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, share: bool, budget: int):
    """Packed passes planned by `budget`, one backward per pass (as gradient accumulation does)."""
    policy.zero_grad()
    prompt_lens, comp_lens = packing.sequence_lengths(mask, C)
    sharing = share and packing.shared_groups(ids, mask, C, G)
    passes = plan_passes(prompt_lens, comp_lens, budget, G if sharing else 1)
    lp, ent = torch.zeros(ids.shape[0], C), torch.zeros(ids.shape[0], C)  # [N, C] each
    for p in passes:
        rows = torch.tensor(flat_rows(p))  # [n']
        part, part_ent = packing.packed_logprobs(
            policy, ids, mask, C, p, share_prompt=sharing, temperature=0.7
        )  # [n', C] each
        (part * mask[rows, P:] * _weights(ids.shape[0])[rows]).sum().backward()
        lp[rows], ent[rows] = part.detach(), part_ent
    return lp * mask[:, P:], ent * mask[:, P:], _grads(policy), passes


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("budget", [10_000, 60])
def test_packed_equals_padded_in_logprobs_and_lora_gradients(policy, share, budget):
    ids, mask = _batch()
    want_lp, want_ent, want_grads = _padded(policy, ids, mask)
    lp, ent, grads, passes = _packed(policy, ids, mask, share, budget)
    assert (len(passes) == 1) == (budget == 10_000)
    assert sorted(r for p in passes for r in flat_rows(p)) == list(range(B * G))
    torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys() and grads
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item())
    assert any(g.abs().max() > 0 for n, g in grads.items() if "layers.0." in n)  # reached the first layer


def test_shared_prompt_is_packed_once_per_group():
    ids, mask = _batch()
    prompt_lens, comp_lens = packing.sequence_lengths(mask, C)
    [p] = plan_passes(prompt_lens, comp_lens, 10_000, G)
    shared = packing.pack_row(ids, mask, C, p, share_prompt=True)
    plain = packing.pack_row(ids, mask, C, p, share_prompt=False)
    body = sum(max(c - 1, 0) for c in comp_lens)
    # group 1 has an empty completion: its prompt is still shared by its three others
    assert shared.input_ids.shape[1] == sum(prompt_lens[::G]) + body
    assert (
        plain.input_ids.shape[1] == sum(pl for pl, c in zip(prompt_lens, comp_lens, strict=True) if c) + body
    )
    assert shared.targets.numel() == plain.targets.numel() == sum(comp_lens)
    prefixed = [s for s in shared.segments if s.prefix_end > s.prefix_start]
    assert prefixed and all(s.prefix_end - s.prefix_start in prompt_lens[::G] for s in prefixed)


def test_plan_fills_passes_up_to_the_budget_with_whole_sequences():
    prompt_lens, comp_lens = [10] * 8, [40, 5, 30, 1, 0, 22, 60, 8]
    passes = plan_passes(prompt_lens, comp_lens, token_budget=80)
    assert sorted(r for p in passes for r in flat_rows(p)) == list(range(8))  # every row once, none split
    for p in passes:
        cost = sum(10 + max(comp_lens[r] - 1, 0) if comp_lens[r] else 0 for r in flat_rows(p))
        assert cost <= 80
    assert passes == plan_passes(prompt_lens, comp_lens, token_budget=80)  # deterministic
    assert len(passes) == 3  # 69 + 10 + 0 | 49 + 31 | 39 + 17 + 14 (FFD; the lower bound is 3)


def test_plan_keeps_groups_together_and_splits_those_over_budget():
    prompt_lens, comp_lens = [10] * 8, [30, 30, 30, 30, 3, 3, 3, 3]
    passes = plan_passes(prompt_lens, comp_lens, token_budget=70, group_size=4)
    groups = [rows for p in passes for rows in p]
    # group 0 (10 + 4 x 29 = 126 tokens) is split into chunks that repeat the prompt; group 1 (18) stays whole
    assert [4, 5, 6, 7] in groups
    assert sorted(r for rows in groups if rows[0] < 4 for r in rows) == [0, 1, 2, 3]
    assert all(len(rows) < 4 for rows in groups if rows[0] < 4)


def test_plan_splits_to_a_minimum_number_of_passes():
    passes = plan_passes([5] * 6, [3] * 6, token_budget=1000, min_passes=3)
    assert len(passes) == 3
    assert sorted(r for p in passes for r in flat_rows(p)) == list(range(6))


def test_an_item_over_budget_gets_a_pass_of_its_own():
    passes = plan_passes([10, 10], [500, 2], token_budget=50)
    assert [flat_rows(p) for p in passes] == [[0], [1]]


def _module_step(
    loss_type: str, share: bool, tokens: int | None, checkpointing: bool = False
) -> tuple[float, dict[str, torch.Tensor], list]:
    """Reference and old log-probs, then the loss and LoRA gradients of one step over `_micro_batches`."""
    from lightning_tina.grpo import GRPOSettings
    from lightning_tina.module import GRPOModule
    from lightning_tina.types import Rollouts

    torch.manual_seed(0)
    grpo = GRPOSettings(
        num_generations=G, batch_size=B * G, micro_batch_size=G, loss_type=loss_type, share_prompt=share,
        micro_batch_tokens=tokens, num_iterations=2, gradient_checkpointing=checkpointing,
    )  # fmt: skip
    m = GRPOModule(model=TINY, lora=LoRASettings(r=4, alpha=8, dropout=0.0), grpo=grpo)
    m.configure_model()
    for name, p in m.policy.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    ids, mask = _batch()
    n = ids.shape[0]
    r = Rollouts(ids, mask, mask[:, P:], [""] * n, [{}] * n, torch.zeros(n, dtype=torch.bool), None)
    ref, old = m._frozen_logprobs(r, reference=True), m._frozen_logprobs(r, reference=False)  # [N, C] each
    old = old + 0.05 * torch.randn(old.shape, generator=torch.Generator().manual_seed(2))  # ratios != 1
    adv = torch.randn(n, generator=torch.Generator().manual_seed(3))  # [N]
    m.policy.zero_grad()
    total, parts = 0.0, []
    for sl in m._micro_batches(r):
        loss, stats = m._micro_batch_loss(r, sl, adv, ref, old, int(r.completion_mask.sum()))
        loss.backward()
        total += float(loss.detach())
        parts.append(stats)
    return total, _grads(m.policy), [ref * r.completion_mask, parts]


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_module_packed_step_equals_count_based_micro_batches(loss_type, share):
    """The step loss and LoRA gradients with micro_batch_tokens equal those of count-based micro-batches, for every
    loss type: the normalisation does not depend on which rows share a pass."""
    want_loss, want_grads, (want_ref, want_parts) = _module_step(loss_type, share, None)
    loss, grads, (ref, parts) = _module_step(loss_type, share, 40)
    assert len(parts) != len(want_parts)  # a different grouping
    torch.testing.assert_close(ref, want_ref, rtol=1e-5, atol=1e-6)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    for key in ("kl", "entropy", "ratio", "clip_low", "clip_high"):
        got, want = sum(getattr(p, key) for p in parts), sum(getattr(p, key) for p in want_parts)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), key
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item())


def test_auto_packs_only_when_count_based_passes_would_compute_padding():
    ids, mask = _batch()
    assert packing.worth_packing(mask, C, micro_batch_size=G, trim=False)  # uneven completions: padding
    full = torch.ones_like(mask)  # [N, P+C]: every row at full length
    assert not packing.worth_packing(full, C, micro_batch_size=G, trim=False)


@pytest.mark.parametrize("uneven", [True, False])
def test_module_auto_budget_follows_the_padding_and_the_attention(uneven):
    from lightning_tina.grpo import GRPOSettings
    from lightning_tina.module import GRPOModule
    from lightning_tina.types import Rollouts

    grpo = GRPOSettings(num_generations=G, batch_size=B * G, micro_batch_size=G)  # micro_batch_tokens "auto"
    m = GRPOModule(model=TINY, lora=LoRASettings(r=4, alpha=8, dropout=0.0), grpo=grpo)
    m.configure_model()
    ids, mask = _batch()
    if not uneven:
        mask = torch.ones_like(mask)  # [N, P+C]
    n = ids.shape[0]
    r = Rollouts(ids, mask, mask[:, P:], [""] * n, [{}] * n, torch.zeros(n, dtype=torch.bool), None)
    passes = m._micro_batches(r)
    assert all(isinstance(p, torch.Tensor) == uneven for p in passes)
    if uneven:  # within the tokens of a padded count-based micro-batch
        assert m._token_budget(mask, C) == min(G * (P + C), packing.AUTO_MAX_TOKENS)


@pytest.mark.parametrize("share", [True, False])
def test_segments_run_through_sdpa_as_exactly(monkeypatch, share):
    """Long segments take SDPA instead of the plain kernel (attention.SEGMENT_SDPA_MIN_SCORES): same results."""
    from lightning_tina import attention

    monkeypatch.setattr(attention, "SEGMENT_SDPA_MIN_SCORES", 0)  # every segment through SDPA
    policy = _policy(CPU_ATTENTION)
    ids, mask = _batch()
    want_lp, _, want_grads = _padded(policy, ids, mask)
    lp, _, grads, _ = _packed(policy, ids, mask, share, 60)
    torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-6)
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item())


def test_packed_passes_work_under_gradient_checkpointing():
    """No KV cache in a packed pass: the prompt is still shared with checkpointed layers (the cache path falls
    back to full sequences there)."""
    want_loss, want_grads, _ = _module_step("grpo", True, None, checkpointing=True)
    loss, grads, _ = _module_step("grpo", True, 40, checkpointing=True)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item())
