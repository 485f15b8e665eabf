"""Fault injection for the resume tests: a callback that kills its own process without any clean-up."""

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL (or another signal) this process when the given optimizer step is about to start."""

    def __init__(self, step: int, sig: str = "SIGKILL") -> None:
        self.step = step
        self.sig = getattr(signal, sig)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)
