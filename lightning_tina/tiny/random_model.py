"""The one builder of random-weight Qwen2 models, for tests and benchmarks (the shipped model is tiny/build.py's)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def save_random_qwen2(
    out: Path | str,
    tokenizer: Any,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    edit: Callable[[torch.nn.Module], None] | None = None,
    **shape: Any,
) -> None:
    """Save a Qwen2ForCausalLM of `shape` (Qwen2Config fields) with random weights, and `tokenizer`, into `out`.

    EOS and pad come from the tokenizer (pad falls back to EOS). Weights are drawn after `torch.manual_seed(seed)` on
    `device`, cast to `dtype`, then `edit(model)` may change them (under no_grad) before saving.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = Qwen2Config(**shape, eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
