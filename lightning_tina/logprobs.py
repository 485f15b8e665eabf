"""Per-token log-probs of sampled completions under a causal LM (the policy, its reference, the old policy).

Three things shape this file:

- **The model is always called through its root module** (the PEFT wrapper or the causal LM), never through the
  decoder backbone alone: under FSDP2 only the root's forward gathers the sharded parameters (embedding and head
  included). The root is asked for the logits of one position only (`logits_to_keep=1`); the final hidden states
  are taken from a forward hook on the final norm and projected to the vocabulary in chunks by
  `grpo.token_logprobs`, so no [N, T, V] logits tensor exists.
- **Each prompt is computed once per group** (`share_prompt=True`): the G completions of a prompt share its
  tokens, so the prompt runs once with a KV cache, the cache is repeated G times, and the completions run on it.
  The result equals the full-sequence forward (same attention inputs; floating-point summation order aside), and
  gradients flow through the cache into the prompt pass, so LoRA weights get the prompt tokens' contribution
  exactly once per group instead of G times. The saving is (G-1)/G of the prompt tokens' compute. Differences from
  the full-sequence path: LoRA dropout draws one mask for the shared prompt instead of G, and layers with gradient
  checkpointing drop the KV cache in training mode, so with checkpointing on, the path falls back to full
  sequences for passes that need gradients.
- **A batch runs at its own length** (`trim_padding=True`): rollouts are padded to the longest prompt and the
  longest completion of the whole step, but a micro-batch (one group, in Tina's recipes) drops the columns that
  none of its rows uses, keeping widths in multiples of `TRIM_MULTIPLE` columns. Exact: those columns are masked
  in every row. With reasoning completions of very different lengths this is most of the padding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_tina import grpo
from lightning_tina.policy import backbone_and_head, causal_lm


def completion_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_len: int,
    group_size: int = 1,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    share_prompt: bool = True,
    with_entropy: bool = True,
    trim_padding: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs and entropies of the last `completion_len` tokens of each row: ([n, C], [n, C] or None when
    `with_entropy` is off).

    With `trim_padding` the pass runs only over the columns some row of this batch uses (see
    `trim_unused_columns`): a micro-batch of short completions costs its own length, not the longest completion of
    the step. Columns cut off get log-prob 0 and entropy 0.

    `input_ids`/`attention_mask` [n, P+C] hold a left-padded prompt and a right-padded completion, group-major
    (rows i*G .. i*G+G-1 share prompt i). The prompt is computed once per group when `share_prompt` is set,
    `group_size` > 1 divides n, the rows of each group really share their prompt, and the pass can use a KV
    cache; otherwise every row runs as one full sequence.
    """
    ids, mask, c = input_ids, attention_mask, completion_len
    if trim_padding:
        ids, mask, c = trim_unused_columns(ids, mask, c)  # [n, P'+C'], C' <= C
    backbone, head = backbone_and_head(model)
    if share_prompt and _can_share(model, ids, mask, c, group_size):
        hidden = _shared_prompt_hidden(model, backbone, ids, mask, c, group_size)  # [n, C', H]
    else:
        hidden = _full_hidden(model, backbone, ids, mask, c)  # [n, C', H]
    targets = ids[:, -c:]  # [n, C']
    logps, entropy = grpo.token_logprobs(
        hidden, targets, head.weight, head.bias, temperature, chunk_tokens, with_entropy
    )  # [n, C'] each
    if c < completion_len:  # columns that no row uses: log-prob and entropy 0 (masked out downstream)
        logps = F.pad(logps, (0, completion_len - c))  # [n, C]
        entropy = F.pad(entropy, (0, completion_len - c)) if entropy is not None else None
    return logps, entropy


TRIM_MULTIPLE = 64
"""Kept prompt and completion widths are rounded up to a multiple of this many columns, so that a run meets a
bounded set of tensor shapes: in bf16 on CPU, oneDNN builds (and caches) kernels per matmul shape, and exact widths
made the tiny model's training passes slower than no trimming at all (bench/README.md, section "`step_breakdown.py`",
results "completions of different lengths (`model.grpo.trim_padding`)")."""


def trim_unused_columns(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int, multiple: int = TRIM_MULTIPLE
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Drop the columns that no row attends to: leading prompt padding and trailing completion padding.

    Returns the narrowed ids and mask [n, P'+C'] and C'. P' and C' are the used widths rounded up to a multiple
    of `multiple` (at most P and C); at least one prompt column and one completion column are kept. Removing
    columns whose mask is 0 in every row changes no position id (they count real tokens only) and no attention
    input, so the log-probs of the kept completion columns are the same.
    """
    p = input_ids.shape[1] - completion_len
    used = attention_mask.bool().any(0)  # [P+C]: columns that some row attends to
    prompt_used, completion_used = used[:p].nonzero(), used[p:].nonzero()  # [k, 1] indices each
    prompt_width = p - int(prompt_used.min()) if prompt_used.numel() else min(p, 1)
    c = int(completion_used.max()) + 1 if completion_used.numel() else 1
    prompt_width = min(p, -(-prompt_width // multiple) * multiple)
    c = min(completion_len, -(-c // multiple) * multiple)
    first = p - prompt_width
    if first == 0 and c == completion_len:
        return input_ids, attention_mask, completion_len
    return input_ids[:, first : p + c], attention_mask[:, first : p + c], c


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as generate() numbers left-padded rows: from each row's first real token. [n, T]"""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _final_norm(backbone: nn.Module) -> nn.Module:
    norm = getattr(backbone, "norm", None)
    if norm is None:
        raise ValueError(
            f"{type(backbone).__name__} has no final `norm` module to read hidden states from; "
            "lightning_tina supports Llama/Qwen-style decoders"
        )
    return norm


def _run(model: nn.Module, backbone: nn.Module, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Call the root model; return the final-norm output [n, T, H] and the KV cache (None without use_cache)."""
    captured: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        captured["hidden"] = output

    handle = _final_norm(backbone).register_forward_hook(keep)
    try:
        out = model(**kwargs, logits_to_keep=1)  # [n, 1, V] logits: only the hidden states are used
    finally:
        handle.remove()
    return captured["hidden"], getattr(out, "past_key_values", None)


def _full_hidden(
    model: nn.Module, backbone: nn.Module, ids: torch.Tensor, mask: torch.Tensor, c: int
) -> torch.Tensor:
    # The last token predicts nothing: leave it out of the pass (causal attention: nothing before it changes).
    ids, mask = ids[:, :-1], mask[:, :-1]  # [n, P+C-1]
    hidden, _ = _run(
        model, backbone, input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False
    )  # [n, P+C-1, H]
    return hidden[:, -c:]  # [n, C, H]: the states that predict the completion


def _shared_prompt_hidden(
    model: nn.Module, backbone: nn.Module, ids: torch.Tensor, mask: torch.Tensor, c: int, g: int
) -> torch.Tensor:
    from transformers import DynamicCache

    p = ids.shape[1] - c
    positions = _positions(mask)  # [n, P+C]
    prompt_hidden, cache = _run(
        model,
        backbone,
        input_ids=ids[::g, :p],  # [b, P]: one row per group
        attention_mask=mask[::g, :p],
        position_ids=positions[::g, :p],
        past_key_values=DynamicCache(),
        use_cache=True,
    )  # [b, P, H]
    if cache is None:
        raise RuntimeError(f"{type(model).__name__} returned no KV cache; set model.grpo.share_prompt false")
    last_prompt = prompt_hidden[:, -1:].repeat_interleave(g, dim=0)  # [n, 1, H]: predicts completion token 0
    if c == 1:
        return last_prompt
    cache.batch_repeat_interleave(g)  # every layer's keys/values [b, ...] -> [b*G, ...], differentiably
    completion_hidden, _ = _run(
        model,
        backbone,
        input_ids=ids[:, p:-1],  # [n, C-1]: the last token predicts nothing
        attention_mask=mask[:, :-1],  # [n, P+C-1]: cached prompt positions + the completion
        position_ids=positions[:, p:-1],
        past_key_values=cache,
        use_cache=True,
    )  # [n, C-1, H]
    return torch.cat([last_prompt, completion_hidden], dim=1)  # [n, C, H]


def _can_share(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, c: int, g: int) -> bool:
    n, total = ids.shape
    if g < 2 or n % g or c < 1 or total - c < 1:
        return False
    if (
        torch.is_grad_enabled()
        and model.training
        and getattr(causal_lm(model), "is_gradient_checkpointing", False)
    ):
        return False  # checkpointed layers drop the cache in training mode
    p = total - c
    prompts, masks = ids[:, :p].view(n // g, g, p), mask[:, :p].view(n // g, g, p)  # [b, G, P]
    # a group's rows must hold one prompt (true for rollouts; cheap to check, and wrong results otherwise)
    return bool((prompts == prompts[:, :1]).all()) and bool((masks == masks[:, :1]).all())
