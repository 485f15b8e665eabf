"""RolloutCallback: owns the rollout engine, keeps it in sync with the policy, and times generation."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Any

import lightning as L
import torch

from lightning_tina.rank_state import gather_ranks, own_rank
from lightning_tina.rollout import EngineName, RolloutEngine, VLLMConfig, make_engine
from lightning_tina.rollout.base import SamplingConfig
from lightning_tina.rollout.batch import make_rollouts
from lightning_tina.rollout.vllm import engine_logprobs_mode
from lightning_tina.types import Generation, PromptBatch, Rollouts


class RolloutCallback(L.Callback):
    """Samples the training rollouts of each step from the current policy.

    Args:
        engine: "hf" (generate on the live policy), "vllm" (colocated vLLM serving the adapter), or "auto"
            (vLLM when installed, else HF with a notice).
        sampling: how training completions are sampled; its temperature is linked to model.grpo.temperature.
        num_generations: G, completions per prompt; linked from model.grpo.num_generations by the CLI.
        vllm: settings of the vLLM engine (memory, parallelism, KV cache; see VLLMConfig).
    """

    def __init__(
        self,
        engine: EngineName = "auto",
        sampling: SamplingConfig = SamplingConfig(),
        num_generations: int = 8,
        vllm: VLLMConfig = VLLMConfig(),
    ) -> None:
        self.engine_name = engine
        self.sampling = replace(sampling)  # a copy: defaults are shared instances
        self.num_generations = num_generations
        self.vllm = replace(vllm)
        self.engine: RolloutEngine | None = None
        self._synced_version = -1
        self._perf: dict[str, float] = {}
        self._restored_rng: torch.Tensor | None = (
            None  # applied right before the first rollout after a resume
        )
        self._step_start: float | None = None

    # The module finds its engine through this registration.
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.rollout = self
        grpo = getattr(pl_module, "grpo", None)
        if grpo is not None:
            if grpo.num_generations != self.num_generations:
                raise ValueError(
                    f"rollout.num_generations={self.num_generations} differs from model.grpo.num_generations="
                    f"{grpo.num_generations}; set it once in model.grpo (the CLI links the two)"
                )
            if abs(grpo.temperature - self.sampling.temperature) > 1e-9:
                raise ValueError(
                    f"model.grpo.temperature={grpo.temperature} differs from rollout.sampling.temperature="
                    f"{self.sampling.temperature}: log-probs would be computed for another distribution"
                )
            mode = engine_logprobs_mode(grpo.logprob_temperature, grpo.temperature)
            if self.vllm.engine_logprobs != mode:
                raise ValueError(
                    f"rollout.vllm.engine_logprobs={self.vllm.engine_logprobs!r} but model.grpo.logprob_temperature="
                    f"{grpo.logprob_temperature} needs {mode!r} for the engine's log-probs to match the trainer's; "
                    "set it once in model.grpo (the CLI links the two)"
                )

    def current_engine(self, pl_module: L.LightningModule) -> RolloutEngine:
        """The engine, created on first use and synced to the policy's current version."""
        if self.engine is None:
            self.engine = make_engine(
                self.engine_name,
                model_name=pl_module.model_name,
                policy=pl_module._require_policy(),
                tokenizer=pl_module.tokenizer,
                dtype=pl_module.dtype_name,
                lora_rank=pl_module.lora.r,
                vllm=self.vllm,
            )
        if self._synced_version != pl_module.policy_version:
            t0 = time.perf_counter()
            self.engine.sync(pl_module.policy, pl_module.policy_version)
            self._perf["perf/sync_s"] = time.perf_counter() - t0
            self._synced_version = pl_module.policy_version
        return self.engine

    def sample(
        self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig, pl_module: L.LightningModule
    ) -> list[Generation]:
        """n completions per prompt from the current policy (group-major)."""
        try:
            return self.current_engine(pl_module).generate(prompt_ids, n, sampling)
        except torch.OutOfMemoryError as err:
            raise torch.OutOfMemoryError(
                f"out of memory while generating {len(prompt_ids)} prompts x {n} completions of up to "
                f"{sampling.max_new_tokens} tokens. Lower model.grpo.batch_size (fewer prompts per step), "
                "rollout.sampling.max_new_tokens, rollout.vllm.max_num_seqs or rollout.vllm.gpu_memory_utilization "
                "(the trainer and vLLM share the GPU), or enable rollout.vllm.enable_sleep_mode"
            ) from err

    def rollouts_for(self, batch: PromptBatch, pl_module: L.LightningModule) -> Rollouts:
        """The training rollouts of one step: G completions for each prompt of the batch, padded."""
        t0 = time.perf_counter()
        gens = self.sample(batch.prompt_ids, self.num_generations, self.sampling, pl_module)
        dt = time.perf_counter() - t0
        tokens = sum(len(g.token_ids) for g in gens)
        self._perf["perf/rollout_tokens_per_s"] = tokens / max(dt, 1e-9)
        return make_rollouts(batch, gens, self.num_generations, pl_module.tokenizer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1 and self._restored_rng is None:
            # seed_everything gives every rank the same seed: without this, ranks would draw the same random numbers
            # for sampling (a resumed run restores each rank's own state instead)
            torch.manual_seed(torch.initial_seed() + trainer.global_rank)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._restored_rng is not None:
            # Restored here, not at load time: Lightning draws from the RNG when it builds the data iterator.
            torch.set_rng_state(self._restored_rng)
            self._restored_rng = None
        now = time.perf_counter()
        if self._step_start is not None:
            self._perf["perf/step_s"] = now - self._step_start
        self._step_start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._perf:
            pl_module.log_dict({k: torch.tensor(v) for k, v in self._perf.items()}, on_step=True)
            self._perf.pop("perf/sync_s", None)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
            self._synced_version = -1

    def state_dict(self) -> dict[str, Any]:
        # The sampling RNG at the end of the last step (each rank's), so that a resumed run draws the same rollouts.
        return gather_ranks(
            {
                "sampling": asdict(self.sampling),
                "engine": self.engine_name,
                "torch_rng": torch.get_rng_state(),
            }
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rng = own_rank(state_dict).get("torch_rng")
        self._restored_rng = rng.clone() if isinstance(rng, torch.Tensor) else None
