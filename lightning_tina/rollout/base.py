"""The interface every rollout engine implements (Hugging Face `generate`, colocated vLLM, ...)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lightning_tina.types import Generation


@dataclass
class SamplingConfig:
    """How completions are sampled. Shared by training rollouts and benchmark evaluation."""

    max_new_tokens: int = 256
    """Longest completion in tokens; longer ones are cut and counted as truncated (Tina: 3584)."""
    min_new_tokens: int = 0
    """EOS is suppressed until a completion has this many tokens (0 = off). Benchmarks use it to force lengths;
    with vLLM the returned log-probs of those first tokens are then under the EOS-masked distribution."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's (0 = off)."""
    stop: list[str] = field(default_factory=list)
    """Extra stop strings; the model's EOS token always stops."""
    seed: int | None = None
    """Seed for this generation call; None draws from the global (checkpointed) RNG."""

    def check(self) -> None:
        """Refuse lengths no engine can honour (every engine calls this before generating)."""
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"sampling.min_new_tokens={self.min_new_tokens} must be between 0 and max_new_tokens "
                f"({self.max_new_tokens})."
            )


class RolloutEngine(ABC):
    """Samples completions from the *current* policy.

    Contract:
    - `sync(policy, version)` is called after every optimizer step that changed the adapter, before the next
      `generate`; after it returns, `generate` must sample from exactly those weights.
    - `generate(prompt_ids, n, sampling)` returns len(prompt_ids) * n generations, group-major: prompt i's n
      completions are at indices i*n .. i*n+n-1. Prompts are token ids (chat template already applied) so that
      every engine sees the same tokens.
    """

    @abstractmethod
    def sync(self, policy: torch.nn.Module, version: int) -> None:
        """Make the engine serve the weights of `policy` (a PEFT model or a plain causal LM)."""

    @abstractmethod
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingConfig
    ) -> list[Generation]:
        """Sample `n` completions per prompt; returns len(prompt_ids) * n generations, group-major."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the engine's resources (processes, memory)."""
