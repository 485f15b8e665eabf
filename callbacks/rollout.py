"""RolloutCallback: gives the module its rollout source (an engine kept in sync with the policy) and times it."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Any

import lightning as L
import torch

from lightning_tina.grpo import GRPOSettings
from lightning_tina.rank_state import gather_ranks, own_rank
from lightning_tina.rollout import EngineName, RolloutEngine, VLLMConfig
from lightning_tina.rollout.base import SamplingConfig
from lightning_tina.rollout.source import EngineRollouts
from lightning_tina.rollout.vllm import VLLMEngine, check_logprob_drift, engine_logprobs_mode


class RolloutCallback(L.Callback):
    """Connects an engine-backed rollout source to the module and runs its lifecycle.

    The module samples through the source it is given (`GRPOModule.connect_rollouts`, typed `RolloutSource`); this
    callback creates that source, logs its timings every step, closes its engine at teardown and checkpoints the
    sampling RNG. No other callback talks to it: BenchmarkEval samples through `pl_module.sampler()`.

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
        # copies: the defaults are shared instances
        self.source = EngineRollouts(engine, replace(sampling), num_generations, replace(vllm))
        self.sampling = self.source.sampling  # the same object: what training samples with
        self.num_generations = num_generations
        self._restored_rng: torch.Tensor | None = None  # set by a resume, applied before the first rollout
        self._step_start: float | None = None

    @property
    def engine(self) -> RolloutEngine | None:
        """The source's engine (None until first use); assignable, e.g. to replay recorded generations."""
        return self.source.engine

    @engine.setter
    def engine(self, engine: RolloutEngine | None) -> None:
        self.source.engine = engine

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        connect = getattr(pl_module, "connect_rollouts", None)
        if connect is None:
            raise TypeError(f"RolloutCallback drives a GRPOModule, not {type(pl_module).__name__}")
        settings = getattr(pl_module, "grpo", None)
        if settings is not None:
            _check_links(settings, self.source)
        connect(self.source)

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
            self.source.perf["perf/step_s"] = now - self._step_start
        self._step_start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        perf = self.source.perf
        if perf:
            pl_module.log_dict({k: torch.tensor(v) for k, v in perf.items()}, on_step=True)
            perf.pop("perf/sync_s", None)
        self._check_freshness(trainer)

    def _check_freshness(self, trainer: L.Trainer) -> None:
        """On GPU, stop when the engine's log-probs drift from the trainer's (rollout.vllm.max_logprob_diff).

        Reads the step's logged engine/logprob_diff_mean (a population: every adapter's, the worst decides); the
        largest over the ranks decides, so that every rank raises together (one rank raising alone would leave the
        others waiting in the next collective)."""
        engine = self.source.engine
        key = "engine/logprob_diff_mean"
        diffs = [v for k, v in trainer.callback_metrics.items() if k == key or k.startswith(key + "/")]
        if not isinstance(engine, VLLMEngine) or not engine.on_gpu or not diffs:
            return
        diff = torch.stack([d.detach().float() for d in diffs]).max()
        worst = trainer.strategy.reduce(diff.to(trainer.strategy.root_device), reduce_op="max")
        check_logprob_drift(float(worst), self.source.vllm.max_logprob_diff, on_gpu=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.source.close()

    def state_dict(self) -> dict[str, Any]:
        # The sampling RNG at the end of the last step (each rank's), so that a resumed run draws the same rollouts.
        return gather_ranks(
            {
                "sampling": asdict(self.sampling),
                "engine": self.source.engine_name,
                "torch_rng": torch.get_rng_state(),
            }
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rng = own_rank(state_dict).get("torch_rng")
        self._restored_rng = rng.clone() if isinstance(rng, torch.Tensor) else None


def _check_links(settings: GRPOSettings, source: EngineRollouts) -> None:
    """The values the CLI links from model.grpo must agree when the classes are built by hand."""
    if settings.num_generations != source.group_size:
        raise ValueError(
            f"rollout.num_generations={source.group_size} differs from model.grpo.num_generations="
            f"{settings.num_generations}; set it once in model.grpo (the CLI links the two)"
        )
    if abs(settings.temperature - source.sampling.temperature) > 1e-9:
        raise ValueError(
            f"model.grpo.temperature={settings.temperature} differs from rollout.sampling.temperature="
            f"{source.sampling.temperature}: log-probs would be computed for another distribution"
        )
    mode = engine_logprobs_mode(settings.logprob_temperature, settings.temperature)
    if source.vllm.engine_logprobs != mode:
        raise ValueError(
            f"rollout.vllm.engine_logprobs={source.vllm.engine_logprobs!r} but model.grpo.logprob_temperature="
            f"{settings.logprob_temperature} needs {mode!r} for the engine's log-probs to match the trainer's; "
            "set it once in model.grpo (the CLI links the two)"
        )
