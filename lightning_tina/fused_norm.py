"""RMSNorm with a hand-written backward for frozen norm weights (the LoRA case).

Hugging Face's RMSNorm (Qwen2, Qwen3, Llama, Mistral) is six element-wise ops (cast, square, mean, add, rsqrt,
multiply) followed by a cast and the weight multiply; autograd keeps several of their results and runs as many
ops again backwards, on [tokens, hidden] tensors, twice per decoder layer. With the weight frozen, the gradient is
dx = rstd * (g w - x_hat * mean(g w * x_hat)), and only the input and the [tokens, 1] rstd need saving.
`fused_rms_norm_forward` computes the same output (the same float32 normalization, the same cast, the same weight
multiply) and this gradient in float32; `tests/test_fused_norm.py` checks both against the model's own module.

Used for the classes in `FUSED_NORM_CLASSES` whose weight is frozen; a trainable weight (full fine-tuning) or a
sharded one (outside an FSDP2 unit's forward) runs the class's own forward. Measured in bench/README.md
(`model.fused_norm`, default on).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor, nn

FUSED_NORM_CLASSES = ("Qwen2RMSNorm", "Qwen3RMSNorm", "LlamaRMSNorm", "MistralRMSNorm")
"""RMSNorm classes of transformers whose forward is weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)."""


class _FrozenRMSNorm(torch.autograd.Function):
    """y = w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), normalization in float32; gradient for x only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # x [..., H], weight [H]
        xf = x.float()  # [..., H]
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))  # [..., 1]
        ctx.save_for_backward(x, rstd, weight)
        return weight * (xf * rstd).to(x.dtype)  # [..., H], dtype promoted as in the model's forward

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        x, rstd, weight = ctx.saved_tensors
        xhat = x.float() * rstd  # [..., H]
        gw = grad.float() * weight.float()  # [..., H]: the gradient at x_hat
        dx = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))  # [..., H]
        return dx.to(x.dtype), None, None


def fused_rms_norm_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    """`forward` of an RMSNorm in FUSED_NORM_CLASSES: the fused function for a frozen, unsharded weight."""
    from torch.distributed.tensor import DTensor

    weight = self.weight
    if weight.requires_grad or isinstance(weight, DTensor):
        return type(self).forward(self, hidden_states)
    return _FrozenRMSNorm.apply(hidden_states, weight, float(self.variance_epsilon))


def install_fused_rms_norm(model: nn.Module) -> int:
    """Give every RMSNorm of FUSED_NORM_CLASSES in `model` the fused forward; returns how many got it."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in FUSED_NORM_CLASSES and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(fused_rms_norm_forward, module)
            count += 1
    return count
