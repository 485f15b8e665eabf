"""`python -m lightning_tina fit|validate|test --config FILE`: the LightningCLI of lightning_tina."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.cli import LightningCLI

from lightning_tina.callbacks.rollout import RolloutCallback
from lightning_tina.datamodule import ReasoningDataModule
from lightning_tina.module import GRPOModule


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
            ("model.grpo.batch_size", "model.grpo.num_generations"), "data.prompts_per_step", prompts_per_step
        )


def cli_main(args: list[str] | None = None, run: bool = True) -> TinaCLI:
    """Run the CLI with `args` (None: sys.argv); tests call this directly."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
