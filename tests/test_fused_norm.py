"""The RMSNorm with a hand-written backward (lightning_tina/fused_norm.py) against the model's own RMSNorm.

The forward is the same sequence of float32 operations, so outputs are equal exactly; the input gradient is the
closed form of the same derivative, equal to autograd's to float32 rounding (float32 inputs) and to bf16 rounding
(bf16 inputs, where autograd rounds the weight multiply to bf16 and the closed form does not). The whole model's
log-probs and LoRA gradients with the fused norm match the model's own norm under bf16 autocast.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from lightning_tina.fused_norm import fused_rms_norm_forward, install_fused_rms_norm
from lightning_tina.logprobs import completion_logprobs
from lightning_tina.policy import LoRASettings, load_causal_lm, wrap_lora


def _norm(dtype: torch.dtype, fused: bool) -> Qwen2RMSNorm:
    norm = Qwen2RMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 64))
    norm.weight.requires_grad_(False)  # frozen, as under LoRA
    if fused:
        norm.forward = fused_rms_norm_forward.__get__(norm)
    return norm


@pytest.mark.parametrize(
    "x_dtype, w_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
)
def test_matches_the_model_norm(x_dtype: torch.dtype, w_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(5, 7, 64, generator=g)).to(x_dtype)  # [B, T, H]
    upstream = torch.randn(5, 7, 64, generator=g)  # [B, T, H]
    outs, grads = [], []
    for fused in (True, False):
        xi = x.clone().requires_grad_(True)
        y = _norm(w_dtype, fused)(xi)  # [B, T, H]
        (y.float() * upstream).sum().backward()
        outs.append(y)
        grads.append(xi.grad)
    assert outs[0].dtype == outs[1].dtype and torch.equal(outs[0], outs[1])
    assert grads[0].dtype == x_dtype
    tol = 1e-6 if x_dtype == torch.float32 and w_dtype == torch.float32 else 2**-7
    err = (grads[0].float() - grads[1].float()).abs().max() / grads[1].float().abs().max()
    assert err <= tol, err


def test_trainable_weights_keep_the_model_forward() -> None:
    norm = _norm(torch.float32, fused=True)
    norm.weight.requires_grad_(True)  # full fine-tuning: the weight needs its gradient
    x = torch.randn(3, 64, requires_grad=True)
    norm(x).sum().backward()
    assert norm.weight.grad is not None and torch.isfinite(norm.weight.grad).all()


def test_policy_logprobs_and_lora_gradients_unchanged(tiny_model: Path) -> None:
    ids = torch.randint(3, 200, (4, 40), generator=torch.Generator().manual_seed(1))  # [N, P+C]
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        base = load_causal_lm(str(tiny_model))
        if fused:
            assert (
                install_fused_rms_norm(base) == 2 * len(base.model.layers) + 1
            )  # two per layer + the final one
        policy = wrap_lora(base, LoRASettings(r=4, alpha=8, dropout=0.0))
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp, _ = completion_logprobs(policy, ids, torch.ones_like(ids), 24, 4, share_prompt=True)  # [N, C]
        lp.sum().backward()
        grads = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
        results.append((lp.detach(), grads))
    (lp1, g1), (lp0, g0) = results
    assert torch.equal(lp1, lp0)  # the forward is the same sequence of operations
    assert (g1 - g0).norm() <= 1e-2 * g0.norm()
