"""TinaProgressBar: Lightning's rich progress bar, labelled in optimizer steps of max_steps, with the reward."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class TinaProgressBar(RichProgressBar):
    """`step 12/60 ... reward: 1.23` instead of `Epoch 0/-2 ... v_num: 0.000`.

    The prompt stream is one endless epoch, so the epoch counter says nothing; the bar's total is trainer.max_steps.
    The CLI adds this bar unless the config names its own or disables the bar (trainer.enable_progress_bar).
    """

    def _get_train_description(self, current_epoch: int) -> str:
        max_steps = self.trainer.max_steps
        return f"GRPO steps (of {max_steps})" if max_steps and max_steps > 0 else "GRPO steps"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the logger's version, not a metric
        return items
