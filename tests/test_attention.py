"""The CPU attention: the same log-probs as SDPA with either kernel, and chosen by default without CUDA."""

from pathlib import Path

import pytest
import torch

from lightning_tina import attention
from lightning_tina.attention import CPU_ATTENTION, register_cpu_attention
from lightning_tina.logprobs import completion_logprobs
from lightning_tina.policy import load_causal_lm

TINY = str(Path(__file__).resolve().parents[1] / "data" / "tiny")


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (4, 40), generator=g)  # [4, 40]
    mask = torch.ones_like(ids)
    ids[0, :7], mask[0, :7] = 0, 0  # a left-padded prompt
    ids[2, -5:], mask[2, -5:] = 0, 0  # a completion that stopped early
    return ids, mask


@pytest.mark.parametrize("kernel", ["plain", "sdpa"])
def test_cpu_attention_matches_sdpa(monkeypatch, kernel):
    register_cpu_attention()
    calls = []
    if kernel == "sdpa":  # a budget of 0 bytes sends every call to SDPA
        monkeypatch.setattr(attention, "PLAIN_MAX_SCORE_BYTES", 0)
    eager_for = attention._eager_for
    monkeypatch.setattr(attention, "_eager_for", lambda m: calls.append(1) or eager_for(m))
    ids, mask = _batch()
    with torch.no_grad():
        ref, _ = completion_logprobs(load_causal_lm(TINY, attn_implementation="sdpa").eval(), ids, mask, 20)
        got, _ = completion_logprobs(
            load_causal_lm(TINY, attn_implementation=CPU_ATTENTION).eval(), ids, mask, 20
        )
    assert bool(calls) == (kernel == "plain")
    m = mask[:, -20:].bool()
    torch.testing.assert_close(got[m], ref[m], rtol=1e-5, atol=1e-5)  # float32 rounding


def test_module_uses_it_by_default_without_cuda(monkeypatch):
    from lightning_tina.module import GRPOModule

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    m = GRPOModule(model=TINY)
    m.configure_model()
    assert m.policy.config._attn_implementation == CPU_ATTENTION
    explicit = GRPOModule(model=TINY, attn_implementation="sdpa")
    explicit.configure_model()
    assert explicit.policy.config._attn_implementation == "sdpa"
