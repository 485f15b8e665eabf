"""ResumeCheckpoint: the full training state for `fit --ckpt_path last`, written atomically, also on pre-emption.

The state is small: GRPOModule keeps only the adapter weights in it (the frozen base is reloaded from `model.model`),
plus optimizer, LR schedule, step, the data stream position and the sampling RNG (see DataModule and
RolloutCallback state). Adapters for PEFT/vLLM are AdapterCheckpoint's job.
"""

from __future__ import annotations

import os
import shutil
import signal
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class ResumeCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint with two guarantees.

    - Atomic: every file is written under a temporary name and renamed, so a crash or a full disk never leaves a
      truncated `last.ckpt` (the previous one stays valid).
    - Pre-emption: on SIGTERM (clusters) or SIGINT (Ctrl-C) the current step finishes, `last.ckpt` is written and
      the run stops cleanly; `fit --ckpt_path last` continues it.

    Defaults: save every 50 optimizer steps, keep `last.ckpt` only (save_top_k=0 with no monitor).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int | None = 50,
        save_last: bool = True,
        save_top_k: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=every_n_train_steps,
            save_last=save_last,
            save_top_k=save_top_k,
            **kwargs,
        )
        self._interrupted = False
        self._previous_sigint: Any = None

    def set_period(self, every_n_train_steps: int) -> None:
        """Save every this many optimizer steps (the CLI's checkpoint.resume_every_n_train_steps)."""
        self._every_n_train_steps = every_n_train_steps

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        tmp = f"{filepath}.tmp"
        trainer.save_checkpoint(tmp, self.save_weights_only)
        if trainer.is_global_zero:
            os.replace(tmp, filepath)  # atomic on POSIX: readers see the old file or the new one, never half
        trainer.strategy.barrier()
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        # `last.ckpt` as a real file (a symlink would dangle once top-k pruning deletes its target)
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            tmp = f"{linkpath}.tmp"
            shutil.copyfile(filepath, tmp)
            os.replace(tmp, linkpath)
        trainer.strategy.barrier()

    # ---- pre-emption ---------------------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and hasattr(signal, "SIGINT"):
            try:
                self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
            except ValueError:  # not the main thread (e.g. a notebook worker): keep Python's default
                self._previous_sigint = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._interrupted:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._interrupted = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._interrupted or trainer.received_sigterm:
            path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
            self._save_checkpoint(trainer, path)
            trainer.should_stop = True  # SIGINT; on SIGTERM Lightning itself stops right after this hook
            print(
                f"lightning_tina: interrupted; saved {path}; continue with `fit --ckpt_path last`", flush=True
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None
