"""Cost accounting as pure maths: accelerator-hours and estimated dollars, split into training and evaluation.

Tina reports what each experiment cost in dollars (its cost table: training, evaluation, total), from GPU-hours at
about $1 per L40S GPU-hour. Here a run's wall time is split into phases ("train", "eval"); each phase costs

    accelerator_hours = wall_seconds * devices / 3600        dollars = accelerator_hours * cost_per_gpu_hour

where `devices` counts every accelerator the job holds while it runs (all training processes on all nodes, plus any
held only for rollouts), because a rented GPU costs the same whether it computes or waits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Phase = Literal["train", "eval"]
PHASES: tuple[Phase, ...] = ("train", "eval")

TINA_COST_PER_GPU_HOUR = 1.0
"""Tina's price assumption: about $1 per L40S GPU-hour."""


BENCH_SECONDS = "time/bench_eval_s"
"""Logged by BenchmarkEval: wall seconds of its evaluations in this process so far. CostTracker reads it (from
trainer.callback_metrics) to count that time as evaluation; no callback calls the other."""


def accelerator_hours(wall_seconds: float, devices: int) -> float:
    """Accelerator-hours of `devices` held for `wall_seconds`: seconds * devices / 3600."""
    if wall_seconds < 0 or not math.isfinite(wall_seconds):
        raise ValueError(f"wall_seconds={wall_seconds!r} must be a finite number >= 0")
    if devices < 1:
        raise ValueError(f"devices={devices!r} must be >= 1")
    return wall_seconds * devices / 3600.0


def dollars(hours: float, cost_per_gpu_hour: float) -> float:
    """Estimated cost of `hours` accelerator-hours: hours * cost_per_gpu_hour."""
    if cost_per_gpu_hour < 0 or not math.isfinite(cost_per_gpu_hour):
        raise ValueError(f"cost_per_gpu_hour={cost_per_gpu_hour!r} must be a finite number >= 0")
    return hours * cost_per_gpu_hour


@dataclass(frozen=True)
class PhaseCost:
    """What one phase (or the total) cost."""

    wall_seconds: float
    """Wall-clock seconds spent in the phase (as measured on the process that keeps the ledger)."""
    hours: float
    """Accelerator-hours: wall_seconds * devices / 3600."""
    usd: float
    """Estimated dollars: hours * cost_per_gpu_hour."""


@dataclass(frozen=True)
class CostSummary:
    """A run's cost in the shape of Tina's cost table: training, evaluation and their total."""

    train: PhaseCost
    """Everything that is not evaluation: model loading, rollouts, rewards, optimizer steps, checkpoints."""
    eval: PhaseCost
    """Benchmark evaluation and validation loops."""
    devices: int
    """Accelerators counted for every second of the run."""
    cost_per_gpu_hour: float
    """Price of one accelerator-hour in dollars."""

    @property
    def total(self) -> PhaseCost:
        """Training plus evaluation."""
        return PhaseCost(
            wall_seconds=self.train.wall_seconds + self.eval.wall_seconds,
            hours=self.train.hours + self.eval.hours,
            usd=self.train.usd + self.eval.usd,
        )

    def metrics(self, prefix: str = "cost/") -> dict[str, float]:
        """Flat scalars for a logger: {prefix}{train,eval,total}_{hours,usd} and the wall seconds."""
        out: dict[str, float] = {}
        for name, phase in (("train", self.train), ("eval", self.eval), ("total", self.total)):
            out[f"{prefix}{name}_hours"] = phase.hours
            out[f"{prefix}{name}_usd"] = phase.usd
            out[f"{prefix}{name}_wall_s"] = phase.wall_seconds
        return out


def summarize(seconds: dict[str, float], devices: int, cost_per_gpu_hour: float) -> CostSummary:
    """Price the wall seconds of each phase (`seconds` maps "train"/"eval" to seconds; a missing phase is 0)."""
    unknown = set(seconds) - set(PHASES)
    if unknown:
        raise ValueError(f"unknown cost phases {sorted(unknown)}; use {list(PHASES)}")

    def phase(name: str) -> PhaseCost:
        s = float(seconds.get(name, 0.0))
        h = accelerator_hours(s, devices)
        return PhaseCost(wall_seconds=s, hours=h, usd=dollars(h, cost_per_gpu_hour))

    return CostSummary(
        train=phase("train"), eval=phase("eval"), devices=devices, cost_per_gpu_hour=cost_per_gpu_hour
    )


@dataclass
class PhaseLedger:
    """Splits elapsed wall time between a default phase and nested intervals of other phases.

    Between `start()` and `stop()` every second belongs to `default` ("train" in fit, "eval" in validate/test)
    unless it falls inside `enter(phase)` ... `exit(phase)`; nested intervals of the same phase count once.
    The clock is injectable so that tests can drive it.
    """

    default: Phase = "train"
    """The phase of time not inside any `enter`/`exit` interval."""
    clock: Callable[[], float] = time.perf_counter
    """Monotonic clock in seconds."""
    seconds: dict[str, float] = field(default_factory=lambda: {p: 0.0 for p in PHASES})
    """Closed time per phase (open intervals are added by `elapsed`)."""
    _current: Phase | None = None
    _since: float = 0.0
    _depth: int = 0

    def start(self) -> None:
        """Begin counting (idempotent while running)."""
        if self._current is None:
            self._current, self._since = self.default, self.clock()

    def stop(self) -> None:
        """Close the open interval and stop counting."""
        self._close()
        self._current, self._depth = None, 0

    def enter(self, phase: Phase) -> None:
        """From now on time belongs to `phase` (until the matching `exit`)."""
        if phase not in PHASES:
            raise ValueError(f"phase {phase!r} is not one of {list(PHASES)}")
        if self._current is None:
            return
        if self._depth == 0:
            self._close()
            self._current = phase
        self._depth += 1

    def exit(self, phase: Phase) -> None:
        """End the innermost `enter(phase)`; time goes back to the default phase when none is left open."""
        if self._current is None or self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            self._close()
            self._current = self.default

    def elapsed(self) -> dict[str, float]:
        """Seconds per phase so far, including the open interval."""
        out = dict(self.seconds)
        if self._current is not None:
            out[self._current] += self.clock() - self._since
        return out

    def _close(self) -> None:
        if self._current is not None:
            now = self.clock()
            self.seconds[self._current] += now - self._since
            self._since = now
