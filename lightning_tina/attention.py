"""Attention for CPU runs: the plain matmul-softmax kernel for small score tensors, SDPA for large ones.

On CPU, PyTorch's SDPA (its flash kernel for CPU) is slower than two matmuls and a softmax for the short sequences
of a laptop run (measured on the GRPO training passes of an 18M Qwen2: bench/README.md, section "`vs_trl.py`",
the results "before the hand-written log-prob backward", which introduced the size-adaptive CPU attention). The plain
kernel materializes the [batch, heads, queries, keys] scores, so it is used only while they stay below
`PLAIN_MAX_SCORE_BYTES`; longer sequences (Tina's 4k-token completions) keep SDPA. Both kernels compute the same
attention (the softmax in float32), with the same additive mask.

`load_causal_lm` selects this implementation when the machine has no CUDA device and the config names none;
`model.attn_implementation` overrides it (e.g. "sdpa").
"""

from __future__ import annotations

import sys
from typing import Any

import torch

CPU_ATTENTION = "lightning_tina_cpu"
"""The name under which the attention function is registered with transformers."""
PLAIN_MAX_SCORE_BYTES = 64 * 2**20
"""Largest float32 score tensor ([batch, heads, queries, keys]) computed with the plain kernel; above it, SDPA."""
PACKED_SEGMENTS_KWARG = "packed_segments"
"""The keyword under which `packing.run_packed` hands the segments to `cpu_attention` (transformers passes
unknown forward keywords down to the attention function)."""


def cpu_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [b, heads, q, d]
    key: torch.Tensor,  # [b, kv_heads, k, d]
    value: torch.Tensor,  # [b, kv_heads, k, d]
    attention_mask: torch.Tensor | None,  # [b, 1, q, k] additive
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's own eager attention when the score tensor is small, transformers' SDPA attention otherwise.

    A packed row (lightning_tina/packing.py) comes with its segments: each is computed on its own keys, so the
    work and the score tensors are those of the sequences, not of the whole row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments = kwargs.pop(PACKED_SEGMENTS_KWARG, None)
    if segments is not None:
        from lightning_tina.packing import segment_attention

        return segment_attention(module, query, key, value, segments, _segment_kernel, **kwargs)
    b, heads, q, _ = query.shape
    if b * heads * q * key.shape[-2] * 4 <= PLAIN_MAX_SCORE_BYTES:
        return _eager_for(module)(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


SEGMENT_SDPA_MIN_SCORES = 256 * 256
"""A packed segment with at least this many query x key scores runs SDPA, a smaller one the plain kernel: on the
18M bench model in bf16, SDPA was faster on 480-token sequences and slower on 96-token ones (bench/README.md,
section "Packing: micro-batches by a token budget")."""


def _segment_kernel(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, l, d]
    key: torch.Tensor,  # [1, kv_heads, k, d]
    value: torch.Tensor,  # [1, kv_heads, k, d]
    attention_mask: torch.Tensor,  # [1, 1, l, k] additive
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel for one sequence of a packed row, chosen by its own size."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[-2] * key.shape[-2] >= SEGMENT_SDPA_MIN_SCORES:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return _eager_for(module)(module, query, key, value, attention_mask, **kwargs)


def _eager_for(module: torch.nn.Module) -> Any:
    """The `eager_attention_forward` of the module's own modeling file (every transformers decoder defines one)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def register_cpu_attention() -> str:
    """Register the attention function and its mask (the eager one: additive, float) with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(CPU_ATTENTION, cpu_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CPU_ATTENTION, eager_mask)
    return CPU_ATTENTION
