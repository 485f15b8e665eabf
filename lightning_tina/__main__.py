"""`python -m lightning_tina fit|validate|test --config FILE`: the LightningCLI of lightning_tina."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI

from lightning_tina.callbacks.rollout import RolloutCallback
from lightning_tina.datamodule import ReasoningDataModule
from lightning_tina.module import GRPOModule
from lightning_tina.rollout.vllm import engine_logprobs_mode


def prompts_per_step(batch_size: int, num_generations: int) -> int:
    """B = completions per step / G; the module validates divisibility with a message naming both settings."""
    return max(1, batch_size // max(1, num_generations))


class TinaCLI(LightningCLI):
    """Adds the rollout engine as a `rollout:` section and links every value that two components need."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(RolloutCallback, "rollout")
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
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Lightning 2.6 trips over its own torch.utils._pytree deprecation on every step: noise, not a problem.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # GRPO steps its optimizer inside training_step; the state after the step is exactly what resume needs.
    warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization.*")
    return TinaCLI(
        GRPOModule,
        ReasoningDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # GRPOModule builds AdamW + its schedule from model.optim
    )


if __name__ == "__main__":  # the guard matters: vLLM starts its engine processes with spawn
    cli_main()
