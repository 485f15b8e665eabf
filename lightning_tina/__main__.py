"""`python -m lightning_tina fit|validate|test --config FILE`: the LightningCLI of lightning_tina."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from lightning_tina import patches
from lightning_tina.callbacks.adapter_checkpoint import AdapterCheckpoint
from lightning_tina.callbacks.progress import TinaProgressBar
from lightning_tina.callbacks.resume import ResumeCheckpoint
from lightning_tina.callbacks.rollout import RolloutCallback
from lightning_tina.checks import check_fields
from lightning_tina.datamodule import ReasoningDataModule
from lightning_tina.module import GRPOModule
from lightning_tina.rollout.vllm import engine_logprobs_mode

DEBUG_ENV = "LIGHTNING_TINA_DEBUG"
"""Set to 1 for the full traceback of a configuration error (otherwise one line naming the key)."""


def prompts_per_step(batch_size: int, group_size: int) -> int:
    """B = completions per step / G; GRPOSettings validates divisibility with a message naming both settings."""
    return max(1, batch_size // max(1, group_size))


@dataclass
class CheckpointSettings:
    """Save periods in one place: a recipe changes a period here instead of restating trainer.callbacks (a list,
    which a recipe can only replace whole)."""

    every_n_train_steps: int | None = None
    """AdapterCheckpoint's period in optimizer steps (Tina's save_steps); None: as its callback says."""
    resume_every_n_train_steps: int | None = None
    """ResumeCheckpoint's period; None: as its callback says."""

    def __post_init__(self) -> None:
        periods = {k: getattr(self, k) for k in ("every_n_train_steps", "resume_every_n_train_steps")}
        need = ">= 0 (0: only at the end), or null"
        check_fields("checkpoint", self, [(k, v is None or v >= 0, need) for k, v in periods.items()])

    def apply(self, callbacks: list[Any]) -> None:
        """Set the periods of the checkpoint callbacks that this section names."""
        for cb in callbacks:
            if isinstance(cb, AdapterCheckpoint) and self.every_n_train_steps is not None:
                cb.every_n_train_steps = self.every_n_train_steps
            if isinstance(cb, ResumeCheckpoint) and self.resume_every_n_train_steps is not None:
                cb.set_period(self.resume_every_n_train_steps)


class TinaCLI(LightningCLI):
    """Adds the rollout engine as a `rollout:` section and links every value that two components need."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(RolloutCallback, "rollout")
        parser.add_class_arguments(CheckpointSettings, "checkpoint")
        parser.link_arguments("model.model", "data.tokenizer")
        parser.link_arguments("model.grpo.num_generations", "rollout.num_generations")
        parser.link_arguments("model.grpo.temperature", "rollout.sampling.temperature")
        parser.link_arguments(
            ("model.grpo.logprob_temperature", "model.grpo.temperature"),
            "rollout.vllm.engine_logprobs",
            engine_logprobs_mode,
        )
        parser.link_arguments(
            ("model.grpo.batch_size", "model.grpo.num_generations"), "data.prompts_per_step", prompts_per_step
        )

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        """The trainer, with the checkpoint section applied, TinaProgressBar (unless the config names a bar or turns
        it off) and no TensorBoard hp_metric placeholder."""
        section = self.config_init[self.subcommand] if self.subcommand else self.config_init
        configured = list(config.get("callbacks") or []) + list(callbacks)
        if section.get("checkpoint") is not None:
            section["checkpoint"].apply(configured)
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in configured
        ):
            callbacks = [*callbacks, TinaProgressBar()]
        trainer = super()._instantiate_trainer(config, callbacks)
        patches.no_hp_metric(trainer.loggers)
        return trainer

    def before_fit(self) -> None:
        """On CUDA, refuse a run whose memory plan cannot fit the GPU, naming the setting (lightning_tina/plan.py)."""
        from lightning_tina.plan import check_plan_on_device

        check_plan_on_device(self.config, self.trainer)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters (they take precedence over the config) before any
        # hook runs: check the file first so that a bad path or a truncated file gets a message that names it.
        if self.config.get("subcommand"):
            self._check_ckpt_path(self.config.subcommand)
        super()._parse_ckpt_path()

    def _check_ckpt_path(self, subcommand: str) -> None:
        """A missing or truncated --ckpt_path fails here with its name, not deep inside torch.load."""
        path = self.config[subcommand].get("ckpt_path")
        if not path or path in ("last", "best", "hpc", "registry"):
            return
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"--ckpt_path {path}: no such file; give a .ckpt written by ResumeCheckpoint"
            )
        try:
            torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # truncated zip, wrong format, ...
            raise ValueError(
                f"--ckpt_path {path} is truncated or not a checkpoint ({type(err).__name__}: {err}); "
                "resume from an earlier checkpoint"
            ) from err


def cli_main(args: list[str] | None = None, run: bool = True) -> TinaCLI:
    """Run the CLI with `args` (None: sys.argv); tests call this directly."""
    patches.process_defaults()
    return TinaCLI(
        GRPOModule,
        ReasoningDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # GRPOModule builds AdamW + its schedule from model.optim
    )


def main() -> None:
    """The command: a configuration mistake prints one line that names the key (the traceback with
    LIGHTNING_TINA_DEBUG=1)."""
    try:
        cli_main()
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"lightning_tina: error: {err}  (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":  # the guard matters: vLLM starts its engine processes with spawn
    main()
