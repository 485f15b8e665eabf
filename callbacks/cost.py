"""CostTracker: accelerator-hours and estimated dollars per step (TensorBoard `cost/*`) and a table at the end."""

from __future__ import annotations

from typing import Any

import lightning as L
from rich.console import Console
from rich.table import Table

from lightning_tina.cost import BENCH_SECONDS, TINA_COST_PER_GPU_HOUR, CostSummary, PhaseLedger, summarize


class CostTracker(L.Callback):
    """Price the run like Tina's cost table: training and evaluation, in accelerator-hours and dollars.

    Time counts from this callback's `setup` (model loading, engine start-up included) to `teardown`. During `fit`
    every second is training except Lightning validation loops (timed by their hooks) and benchmark evaluations
    (BenchmarkEval logs their seconds as `time/bench_eval_s`, read here from trainer.callback_metrics), which are
    evaluation; in `validate`/`test` everything is evaluation. Each second costs `devices` accelerators. The
    numbers are logged every optimizer step as `cost/{train,eval,total}_{hours,usd,wall_s}` and printed as a table
    when the run ends.

    Args:
        cost_per_gpu_hour: dollars per accelerator-hour (Tina: about $1 per L40S GPU-hour).
        extra_devices: accelerators the job holds besides the training processes (e.g. a GPU dedicated to vLLM,
            as in Tina's long-completion ablation).
        devices: count this many accelerators instead of trainer.world_size + extra_devices.
    """

    def __init__(
        self,
        cost_per_gpu_hour: float = TINA_COST_PER_GPU_HOUR,
        extra_devices: int = 0,
        devices: int | None = None,
    ) -> None:
        if cost_per_gpu_hour < 0:
            raise ValueError(
                f"CostTracker cost_per_gpu_hour={cost_per_gpu_hour} must be >= 0 (dollars per hour)"
            )
        if extra_devices < 0:
            raise ValueError(f"CostTracker extra_devices={extra_devices} must be >= 0")
        if devices is not None and devices < 1:
            raise ValueError(f"CostTracker devices={devices} must be >= 1, or null to count the trainer's")
        self.cost_per_gpu_hour = cost_per_gpu_hour
        self.extra_devices = extra_devices
        self.devices_override = devices
        self.ledger = PhaseLedger()
        self.summary: CostSummary | None = None
        self._devices = 1
        self._bench_at_setup = 0.0
        self._trainer: L.Trainer | None = None

    # ---- phases --------------------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._devices = self.devices_override or (trainer.world_size + self.extra_devices)
        self.ledger.default = "train" if stage == "fit" else "eval"
        self.ledger.start()
        self._bench_at_setup = self._bench_seconds(trainer)

    @staticmethod
    def _bench_seconds(trainer: L.Trainer) -> float:
        value = getattr(trainer, "callback_metrics", {}).get(BENCH_SECONDS)
        return float(value) if value is not None else 0.0

    def _seconds(self, trainer: L.Trainer) -> dict[str, float]:
        """Seconds per phase so far: the ledger's, with benchmark time moved from training to evaluation."""
        seconds = self.ledger.elapsed()
        moved = self._bench_seconds(trainer) - self._bench_at_setup
        if self.ledger.default == "train":
            seconds["train"] -= moved
            seconds["eval"] += moved
        return seconds

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ledger.enter("eval")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ledger.exit("eval")

    # ---- reporting -----------------------------------------------------------------------------------------------

    def current(self, trainer: L.Trainer) -> CostSummary:
        """The cost so far."""
        return summarize(self._seconds(trainer), self._devices, self.cost_per_gpu_hour)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pl_module.log_dict(self.current(trainer).metrics(), on_step=True, on_epoch=False)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.ledger.stop()
        self.summary = summarize(self._seconds(trainer), self._devices, self.cost_per_gpu_hour)
        if trainer.logger is not None:
            trainer.logger.log_metrics(self.summary.metrics(), step=trainer.global_step)
        if trainer.is_global_zero:
            Console().print(cost_table(self.summary))

    # ---- resume --------------------------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer  # state_dict (called by checkpointing) reads the benchmark seconds through it

    def state_dict(self) -> dict[str, Any]:
        return {
            "seconds": self._seconds(self._trainer) if self._trainer is not None else self.ledger.elapsed()
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for phase, s in state_dict.get("seconds", {}).items():
            self.ledger.seconds[phase] = self.ledger.seconds.get(phase, 0.0) + float(s)


def cost_table(summary: CostSummary) -> Table:
    """Tina's cost table for one run: training, evaluation, total."""
    table = Table(
        title=f"Cost ({summary.devices} accelerator(s) x ${summary.cost_per_gpu_hour:g} per accelerator-hour)"
    )
    table.add_column("phase")
    table.add_column("wall time", justify="right")
    table.add_column("accelerator-hours", justify="right")
    table.add_column("estimated cost", justify="right")
    for name, phase in (("training", summary.train), ("evaluation", summary.eval), ("total", summary.total)):
        table.add_row(name, _hms(phase.wall_seconds), f"{phase.hours:.4f}", f"${phase.usd:.2f}")
    return table


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
