"""Rollout sources: where GRPOModule's completions come from (the `RolloutSource` interface of rollout/base.py).

- `EngineRollouts`: samples from the live policy through a rollout engine (HF `generate` or colocated vLLM),
  created on first use and synced whenever the policy's version changes. RolloutCallback owns one.
- `ReplayRollouts`: fixed completions, replayed step after step (tests, parity harnesses, bench scripts).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch

from lightning_tina.rollout import EngineName, RolloutEngine, VLLMConfig, make_engine
from lightning_tina.rollout.base import Adapters, PolicyHandle, SamplingConfig, with_adapters
from lightning_tina.rollout.batch import make_rollouts
from lightning_tina.types import Generation, PromptBatch, Rollouts


@contextlib.contextmanager
def generation_memory_advice(num_prompts: int, n: int, max_new_tokens: int) -> Iterator[None]:
    """Re-raise an out-of-memory error of generation with the settings that lower its memory (the one place that
    advice lives)."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        raise torch.OutOfMemoryError(
            f"out of memory while generating {num_prompts} prompts x {n} completions of up to "
            f"{max_new_tokens} tokens. Lower model.grpo.batch_size (fewer prompts per step), "
            "rollout.sampling.max_new_tokens, rollout.vllm.max_num_seqs or rollout.vllm.gpu_memory_utilization "
            "(the trainer and vLLM share the GPU), or enable rollout.vllm.enable_sleep_mode"
        ) from err


class EngineRollouts:
    """A RolloutSource backed by a rollout engine that serves the module's current weights.

    Args:
        engine: "hf", "vllm" or "auto" (see rollout.make_engine).
        sampling: how training completions are sampled.
        group_size: completions per prompt in training (model.grpo.num_generations).
        vllm: the vLLM engine's settings.
    """

    def __init__(
        self, engine: EngineName, sampling: SamplingConfig, group_size: int, vllm: VLLMConfig
    ) -> None:
        self.engine_name = engine
        self.sampling = sampling
        self.group_size = group_size
        self.vllm = vllm
        self.engine: RolloutEngine | None = None
        self.synced_version = -1
        self.perf: dict[str, float] = {}  # seconds and rates of the last step, logged by RolloutCallback

    @property
    def max_new_tokens(self) -> int:
        return self.sampling.max_new_tokens

    def current_engine(self, policy: PolicyHandle) -> RolloutEngine:
        """The engine, created on first use and synced to the policy's current version."""
        weights, version = policy.current_policy()
        if self.engine is None:
            spec = policy.engine_spec()
            self.engine = make_engine(
                self.engine_name,
                model_name=spec.model_name,
                policy=weights,
                tokenizer=policy.tokenizer,
                dtype=spec.dtype,
                lora_rank=spec.lora_rank,
                vllm=self.vllm,
                adapters=spec.adapters,
            )
        if self.synced_version != version:
            t0 = time.perf_counter()
            self.engine.sync(weights, version)
            self.perf["perf/sync_s"] = time.perf_counter() - t0
            self.synced_version = version
        return self.engine

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        n: int,
        sampling: SamplingConfig,
        policy: PolicyHandle,
        adapters: Adapters = None,
    ) -> list[Generation]:
        """n completions per prompt from the current policy (group-major), prompt i through adapter adapters[i]."""
        with generation_memory_advice(len(prompt_ids), n, sampling.max_new_tokens):
            engine = self.current_engine(policy)
            return with_adapters(engine.generate, prompt_ids, n, sampling, adapters=adapters)

    def rollouts(self, batch: PromptBatch, policy: PolicyHandle, adapters: Adapters = None) -> Rollouts:
        """The training rollouts of one step: G completions for each prompt of the batch, padded."""
        t0 = time.perf_counter()
        args = (batch.prompt_ids, self.group_size, self.sampling, policy)
        gens = with_adapters(self.generate, *args, adapters=adapters)
        dt = time.perf_counter() - t0
        self.perf["perf/rollout_tokens_per_s"] = sum(len(g.token_ids) for g in gens) / max(dt, 1e-9)
        return make_rollouts(batch, gens, self.group_size, policy.tokenizer)

    def close(self) -> None:
        """Release the engine (it is created again on next use)."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
            self.synced_version = -1


class ReplayRollouts:
    """A RolloutSource of fixed completions: step i gets `steps[i % len(steps)]`, whatever the batch and policy.

    Each entry is either the `Rollouts` of one step or its generations (group-major, `group_size` per prompt),
    turned into Rollouts with the batch's prompts (a population's batch holds every adapter's prompts, adapter-major;
    the adapter names are not needed to replay). `generate` (evaluation) replays `eval_generations` in order when
    given, and refuses otherwise.
    """

    def __init__(
        self,
        steps: Sequence[Rollouts | Sequence[Generation]],
        group_size: int,
        max_new_tokens: int,
        eval_generations: Sequence[Generation] | None = None,
    ) -> None:
        if not steps:
            raise ValueError("ReplayRollouts needs at least one step of rollouts")
        self.steps = list(steps)
        self.group_size = group_size
        self._max_new_tokens = max_new_tokens
        self.eval_generations = list(eval_generations) if eval_generations is not None else None
        self.calls = 0

    @property
    def max_new_tokens(self) -> int:
        return self._max_new_tokens

    def rollouts(self, batch: PromptBatch, policy: PolicyHandle, adapters: Adapters = None) -> Rollouts:
        step = self.steps[self.calls % len(self.steps)]
        self.calls += 1
        if isinstance(step, Rollouts):
            return step
        return make_rollouts(batch, list(step), self.group_size, policy.tokenizer)

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        n: int,
        sampling: SamplingConfig,
        policy: PolicyHandle,
        adapters: Adapters = None,
    ) -> list[Generation]:
        if self.eval_generations is None:
            raise RuntimeError("this ReplayRollouts has no eval_generations to replay for evaluation")
        want = len(prompt_ids) * n
        out = [g._replace(token_ids=list(g.token_ids)) for g in self.eval_generations[:want]]
        if len(out) != want:
            raise RuntimeError(f"ReplayRollouts has {len(out)} eval generations, {want} were asked for")
        return out
