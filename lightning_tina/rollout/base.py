"""The seams of rollout generation.

- `RolloutEngine`: what every engine implements (Hugging Face `generate`, colocated vLLM, ...).
- `Sampler`: anything that samples from the current policy (`generate`); engines are samplers, and so is what
  `GRPOModule.sampler()` returns. `evaluate()` takes a Sampler.
- `RolloutSource`: the one interface between GRPOModule and whatever produces its rollouts. The module holds one
  (`GRPOModule.connect_rollouts`), passes itself as the `PolicyHandle`, and uses it for training (`rollouts`),
  validate/test and BenchmarkEval (`generate`). RolloutCallback connects an engine-backed source
  (lightning_tina/rollout/source.py); tests and parity harnesses connect a `ReplayRollouts` of fixed completions.
- `PolicyHandle`: the module's public surface a source may read (no private attributes).

Names: the settings of the rollout side (the `rollout:` section) are `*Config` (SamplingConfig, VLLMConfig); those
of the model (`model:`) are `*Settings`. Every one checks its fields when it is built (`__post_init__`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from lightning_tina.types import Generation, PromptBatch, Rollouts


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

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse values no engine can honour, one message per field (also called by engines before generating)."""
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens={self.max_new_tokens} must be >= 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"sampling.min_new_tokens={self.min_new_tokens} must be between 0 and max_new_tokens "
                f"({self.max_new_tokens})."
            )
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"sampling.min_p={self.min_p} must be in [0, 1] (0 = off)")


@dataclass(frozen=True)
class EngineSpec:
    """What an engine needs to know about the policy to start: where its base weights are and their shape."""

    model_name: str
    """Local directory or hub id of the base model."""
    dtype: str
    """The trainer's weight dtype (float32, bfloat16, float16)."""
    lora_rank: int
    """The largest adapter rank, model.lora.r or the largest of a population's (vLLM's max_lora_rank)."""
    adapters: tuple[str, ...] = ()
    """A population's adapter names (model.population), in order; () for a solo run (one unnamed adapter, or
    none). Engines serve every one of them and `generate` picks one per prompt."""


@runtime_checkable
class PolicyHandle(Protocol):
    """The module's public surface a rollout source reads: the tokenizer, the engine spec and the live weights."""

    tokenizer: Any

    def engine_spec(self) -> EngineSpec:
        """Base model, dtype and adapter rank."""
        ...

    def current_policy(self) -> tuple[torch.nn.Module, int]:
        """The live policy (loaded on first use) and its version, bumped after every optimizer step."""
        ...


Adapters = Sequence[str] | None
"""Per prompt, the name of the population adapter that samples it (`EngineSpec.adapters`); None: the policy as it
is (a solo run). Population callers lay prompts out adapter-major, so each adapter's prompts are one run."""


def with_adapters(call: Any, *args: Any, adapters: Adapters = None) -> Any:
    """`call(*args, adapters)`, or `call(*args)` without adapters: samplers, engines and sources written before
    populations take no `adapters` argument, and a solo run passes none."""
    return call(*args) if adapters is None else call(*args, adapters)


@runtime_checkable
class Sampler(Protocol):
    """Samples `n` completions per prompt from the current policy; returns len(prompt_ids) * n, group-major.
    `adapters` names each prompt's population adapter (None: the policy as it is)."""

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        n: int,
        sampling: SamplingConfig,
        adapters: Adapters = None,
    ) -> list[Generation]: ...


@runtime_checkable
class RolloutSource(Protocol):
    """What GRPOModule gets its completions from (training, validate/test and BenchmarkEval alike).

    `rollouts` gives the training rollouts of one step (G completions per prompt, padded); `generate` samples with
    any settings (evaluation); both sample from `policy.current_policy()`, prompt i through adapter `adapters[i]`
    when given (a population). `max_new_tokens` is the training completion budget (Dr. GRPO's constant normaliser).
    """

    @property
    def max_new_tokens(self) -> int: ...

    def rollouts(self, batch: PromptBatch, policy: PolicyHandle, adapters: Adapters = None) -> Rollouts: ...

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        n: int,
        sampling: SamplingConfig,
        policy: PolicyHandle,
        adapters: Adapters = None,
    ) -> list[Generation]: ...


class RolloutEngine(ABC):
    """Samples completions from the *current* policy.

    Contract:
    - `sync(policy, version)` is called after every optimizer step that changed the adapter, before the next
      `generate`; after it returns, `generate` must sample from exactly those weights.
    - `generate(prompt_ids, n, sampling)` returns len(prompt_ids) * n generations, group-major: prompt i's n
      completions are at indices i*n .. i*n+n-1. Prompts are token ids (chat template already applied) so that
      every engine sees the same tokens.
    - `adapters` (a population, `EngineSpec.adapters`): prompt i is sampled through the adapter named
      `adapters[i]`, every adapter from the weights of the last `sync`; None samples the policy as it is.
    """

    @abstractmethod
    def sync(self, policy: torch.nn.Module, version: int) -> None:
        """Make the engine serve the weights of `policy` (a PEFT model or a plain causal LM)."""

    @abstractmethod
    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        n: int,
        sampling: SamplingConfig,
        adapters: Adapters = None,
    ) -> list[Generation]:
        """Sample `n` completions per prompt; returns len(prompt_ids) * n generations, group-major."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the engine's resources (processes, memory)."""
