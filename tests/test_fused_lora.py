"""The fused LoRA linear (lightning_tina/fused_lora.py) against PEFT's own forward and backward.

Float32: outputs and every gradient (adapter weights, input) equal PEFT's to float32 rounding, with and without
dropout (the same dropout mask: both draw it once, on the same input). bf16 autocast: the fused layer rounds once
where PEFT rounds twice, so both are compared with a float64 computation and the fused error must be no larger
than twice PEFT's or 2^-6. The layers it does not cover must run PEFT's forward unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_tina.fused_lora import _fused_plan, fused_lora_forward, install_fused_lora
from lightning_tina.policy import LoRASettings, load_causal_lm, wrap_lora


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 24)  # with a bias
        self.out = nn.Linear(24, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.proj(x)))


def _peft(
    dropout: float = 0.0, fused: bool = False, dtype: torch.dtype = torch.float32, **extra: object
) -> nn.Module:
    """Seeded two-layer model with a LoRA adapter (scale alpha/r = 2.5, not a power of two) and nonzero B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        _TwoLayers(),
        LoraConfig(r=4, lora_alpha=10, lora_dropout=dropout, target_modules=["proj", "out"], **extra),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    model.to(dtype)  # after the seeded initialization, so every dtype starts from the same weights
    if fused:
        assert install_fused_lora(model) == 2
    return model


def _run(
    model: nn.Module, x: torch.Tensor, amp: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Output, adapter gradients and input gradient of a weighted sum of the outputs (dropout seeded)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        torch.manual_seed(5)
        y = model(x)  # [B, T, 8]
    (y.double() * torch.linspace(-1.0, 2.0, 8, dtype=torch.float64)).sum().backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    return y.double(), grads, x.grad.double()


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of `b`."""
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_float32_equals_peft(dropout: float) -> None:
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))  # [B, T, in]
    y0, g0, gx0 = _run(_peft(dropout).train(), x, amp=False)
    y1, g1, gx1 = _run(_peft(dropout, fused=True).train(), x, amp=False)
    assert sorted(g0) == sorted(g1) and len(g0) == 4  # lora_A and lora_B of both layers, nothing else
    assert _err(y1, y0) <= 1e-6 and _err(gx1, gx0) <= 1e-6
    for name in g0:
        assert _err(g1[name], g0[name]) <= 1e-6, name


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_bf16_autocast_is_as_close_to_float64_as_peft(dropout: float) -> None:
    x = torch.randn(4, 33, 16, generator=torch.Generator().manual_seed(2))  # [B, T, in]
    y_exact, g_exact, gx_exact = _run(_peft(dropout, dtype=torch.float64).train(), x.double(), amp=False)
    y0, g0, gx0 = _run(_peft(dropout).train(), x, amp=True)
    y1, g1, gx1 = _run(_peft(dropout, fused=True).train(), x, amp=True)

    # bf16 keeps 8 significant bits: relative errors of a few 2^-8 are rounding (both paths show 0.4-0.9%);
    # a wrong term (scale, dropout mask, transposed factor) is an error of order 1.
    assert _err(y1, y_exact) <= max(2 * _err(y0, y_exact), 2**-6)
    assert _err(gx1, gx_exact) <= max(2 * _err(gx0, gx_exact), 2**-6)
    for name in g0:
        assert _err(g1[name], g_exact[name]) <= max(2 * _err(g0[name], g_exact[name]), 2**-6), name


def test_what_it_does_not_cover_runs_peft() -> None:
    """Disabled (the reference pass), merged, DoRA, extra arguments, no autocast with mixed dtypes: PEFT's path."""
    x = torch.randn(2, 3, 16)  # [B, T, in]
    model = _peft(fused=True).eval()
    layer = model.base_model.model.proj
    assert _fused_plan(layer, x, (), {}) == ("default", torch.float32)
    base = nn.Linear(16, 24)
    base.load_state_dict(layer.base_layer.state_dict())
    with model.disable_adapter():
        assert _fused_plan(layer, x, (), {}) is None
        torch.testing.assert_close(layer(x), base(x))
    assert _fused_plan(layer, x, (), {"adapter_names": ["default"] * 2}) is None
    with torch.no_grad():
        want = layer(x)
        model.merge_adapter()
        assert _fused_plan(layer, x, (), {}) is None
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
        model.unmerge_adapter()
    with torch.no_grad():
        layer.lora_A["default"].weight.data = layer.lora_A["default"].weight.data.bfloat16()
    assert _fused_plan(layer, x, (), {}) is None  # float32 input, bf16 adapter, no autocast: PEFT's casts
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _fused_plan(layer, x, (), {}) == ("default", torch.bfloat16)
    layer.base_layer.weight.requires_grad_(True)  # a trainable base weight would get no gradient here
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _fused_plan(layer, x, (), {}) is None

    dora = _peft(fused=True, use_dora=True).eval()
    assert _fused_plan(dora.base_model.model.proj, x, (), {}) is None
    plain = _peft(use_dora=True).eval()
    torch.testing.assert_close(dora(x), plain(x))


def test_gradient_checkpointing_and_no_grad() -> None:
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(2, 7, 16)  # [B, T, in]
    ref, fused = _peft(), _peft(fused=True)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x))
    out0 = checkpoint(ref, x, use_reentrant=False).sum()
    out1 = checkpoint(fused, x, use_reentrant=False).sum()
    out0.backward()
    out1.backward()
    for (n0, p0), (_, p1) in zip(ref.named_parameters(), fused.named_parameters(), strict=True):
        if p0.grad is not None:
            torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-5, atol=1e-6, msg=n0)


def test_policy_gets_it_on_every_projection_unless_turned_off(tiny_model: Path) -> None:
    from peft.tuners.lora.layer import Linear as LoRALinear

    def fused_layers(policy: nn.Module) -> tuple[int, int]:
        layers = [m for m in policy.modules() if type(m) is LoRALinear]
        return len(layers), sum(
            m.__dict__.get("forward").__func__ is fused_lora_forward
            for m in layers
            if "forward" in m.__dict__
        )

    on = wrap_lora(load_causal_lm(str(tiny_model)), LoRASettings(r=4, alpha=8))
    off = wrap_lora(load_causal_lm(str(tiny_model)), LoRASettings(r=4, alpha=8, fused=False))
    n = len(on.get_base_model().model.layers) * 7
    assert fused_layers(on) == (n, n) and fused_layers(off) == (n, 0)
