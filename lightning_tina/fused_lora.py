"""A LoRA linear layer as one autograd function: y = x W^T + b + s * (dropout(x) A^T) B^T.

PEFT's `lora.Linear` computes the frozen layer, casts the input to the adapter's dtype, runs `lora_A` and `lora_B`
as two more layers, multiplies by the scale and adds: under bf16 autocast with float32 adapters (lightning_tina's
setting) that is two casts of the input, a scale multiply and an add per layer in the forward and as many again in
the backward, on [tokens, features] tensors, for every one of the seven projections of every decoder layer.
`fused_lora_forward` computes the same thing with three matrix products in the forward (the low-rank product is
accumulated into the frozen layer's output by `addmm_`) and four or five in the backward, saving only the
(cast) input, the rank-r activation and the cast weights.

Same numbers up to rounding: in float32 the result and the adapter gradients equal PEFT's to float32 rounding; in
bf16 the low-rank product is added before rounding instead of after (one rounding instead of two).
`tests/test_fused_lora.py` checks both against PEFT, with dropout, under autocast and through gradient checkpointing.
Layers or calls that this does not cover run PEFT's own forward: adapters disabled (the reference pass) or merged,
several active adapters, DoRA and other variants, an adapter bias, mixed-adapter batches, a trainable or sharded
base weight, and dtypes that differ without autocast (PEFT then computes the adapter in its own dtype).

Measured in bench/README.md (`model.lora.fused`, default on).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor, nn


class _LoRALinear(torch.autograd.Function):
    """y = x W^T + b + (x_lora A^T) (s B)^T in `dtype`; gradients for x, x_lora, A and B (W and b are frozen)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,  # [..., in]
        x_lora: Tensor | None,  # [..., in]: dropout(x); None = x itself
        weight: Tensor,  # [out, in], frozen
        bias: Tensor | None,  # [out], frozen
        lora_a: Tensor,  # [r, in]
        lora_b: Tensor,  # [out, r]
        scale: float,
        dtype: torch.dtype,
    ) -> Tensor:
        lead, d_in = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, d_in).to(dtype)  # [N, in]
        xl = x2 if x_lora is None else x_lora.reshape(-1, d_in).to(dtype)  # [N, in]
        w, a = weight.to(dtype), lora_a.to(dtype)  # [out, in], [r, in]
        sb = (lora_b * scale).to(dtype)  # [out, r]
        out = x2 @ w.t() if bias is None else torch.addmm(bias.to(dtype), x2, w.t())  # [N, out]
        h = xl @ a.t()  # [N, r]
        out.addmm_(h, sb.t())  # [N, out]: the low-rank update, added before rounding
        ctx.save_for_backward(xl, h, w, a, sb)
        ctx.scale, ctx.shared = scale, x_lora is None
        ctx.dtypes = (x.dtype, None if x_lora is None else x_lora.dtype, lora_a.dtype, lora_b.dtype)
        return out.reshape(*lead, -1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xl, h, w, a, sb = ctx.saved_tensors
        x_dtype, xl_dtype, a_dtype, b_dtype = ctx.dtypes
        lead = grad.shape[:-1]
        g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)  # [N, out]
        gh = g @ sb  # [N, r]: gradient at the rank-r activation
        grad_b = (g.t() @ h).to(b_dtype).mul_(ctx.scale) if ctx.needs_input_grad[5] else None  # [out, r]
        grad_a = (gh.t() @ xl).to(a_dtype) if ctx.needs_input_grad[4] else None  # [r, in]
        grad_x = grad_xl = None
        if ctx.shared:
            if ctx.needs_input_grad[0]:
                grad_x = torch.addmm(g @ w, gh, a).to(x_dtype).reshape(*lead, -1)  # [..., in]
        else:
            if ctx.needs_input_grad[0]:
                grad_x = (g @ w).to(x_dtype).reshape(*lead, -1)  # [..., in]
            if ctx.needs_input_grad[1]:
                grad_xl = (gh @ a).to(xl_dtype).reshape(*lead, -1)  # [..., in]
        return grad_x, grad_xl, None, None, grad_a, grad_b, None, None


def _fused_plan(layer: nn.Module, x: Tensor, args: tuple, kwargs: dict) -> tuple[str, torch.dtype] | None:
    """(adapter name, compute dtype) when the fused function computes what PEFT's forward would, else None."""
    from torch.distributed.tensor import DTensor

    if args or kwargs or layer.disable_adapters or layer.merged or layer.fan_in_fan_out:
        return None
    active = [n for n in layer.active_adapters if n in layer.lora_A]
    # DoRA and other variants (the attributes are absent in older PEFT releases)
    variants, dora = getattr(layer, "lora_variant", {}), getattr(layer, "use_dora", {})
    if len(active) != 1 or active[0] in variants or dora.get(active[0], False):
        return None
    name = active[0]
    base, lora_a, lora_b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    if (
        type(base) is not nn.Linear
        or type(lora_a) is not nn.Linear
        or type(lora_b) is not nn.Linear
        or lora_a.bias is not None
        or lora_b.bias is not None
        or base.weight.requires_grad
        or (base.bias is not None and base.bias.requires_grad)
        or any(isinstance(p, DTensor) for p in (base.weight, lora_a.weight, lora_b.weight))
    ):
        return None
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return name, torch.get_autocast_dtype(kind)
    if x.dtype == base.weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype:
        return name, x.dtype
    return None


def fused_lora_forward(self: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """`forward` of a PEFT `lora.Linear`: the fused function where it applies, PEFT's own forward otherwise."""
    plan = _fused_plan(self, x, args, kwargs)
    if plan is None:
        return type(self).forward(self, x, *args, **kwargs)
    name, dtype = plan
    dropout = self.lora_dropout[name]
    x_lora = None if isinstance(dropout, nn.Identity) or not self.training else dropout(x)
    base, lora_a, lora_b = self.base_layer, self.lora_A[name], self.lora_B[name]
    return _LoRALinear.apply(
        x, x_lora, base.weight, base.bias, lora_a.weight, lora_b.weight, float(self.scaling[name]), dtype
    )


def install_fused_lora(model: nn.Module) -> int:
    """Give every PEFT `lora.Linear` in `model` the fused forward; returns how many layers got it."""
    from peft.tuners.lora.layer import Linear as LoRALinear

    count = 0
    for module in model.modules():
        if type(module) is LoRALinear:
            module.forward = types.MethodType(fused_lora_forward, module)
            count += 1
    return count
