"""BenchmarkEval: scores the live policy on benchmarks before training, every N steps, and at the end of fit."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from rich.console import Console
from rich.table import Table

from lightning_tina.benchmarks import Benchmark, load_benchmarks
from lightning_tina.callbacks._period import train_step_period
from lightning_tina.cost import BENCH_SECONDS
from lightning_tina.evaluate import EvalResult, evaluate, percent, write_results
from lightning_tina.rollout.base import SamplingConfig

_TINA_EVAL_SAMPLING = SamplingConfig(max_new_tokens=96, temperature=0.6, top_p=0.95, seed=0)
"""Tina's evaluation protocol (temperature 0.6, top_p 0.95) with completions short enough for the tiny model."""


class BenchmarkEval(L.Callback):
    """Evaluate through the module's rollout source and log `bench/<name>/pass@1` and friends.

    Args:
        benchmarks: registry names (see lightning_tina.benchmarks), e.g. [tiny_heldout] or [aime24, math500].
        data_dir: local benchmark files (a folder laid out like shared/benchmarks); None loads from the hub.
        limit: keep the first `limit` problems of each benchmark (None: all).
        k: samples per problem; pass@1 is their mean, with its standard error, and pass@k is unbiased.
        sampling: the evaluation protocol (Tina: temperature 0.6, top_p 0.95; its max_new_tokens is 32,768).
        every_n_train_steps: also evaluate after every N optimizer steps (0: only before and after training).
        before: evaluate once before the first step, so the end-of-fit table shows before and after.
        strict: grade with the strict checker (True) or reproduce Tina's lenient lighteval verdicts (False).
        out_dir: if set, write results.json / results.md / samples.jsonl there after the last evaluation.
        every_n_steps: the old name of every_n_train_steps (still accepted, with a warning).
    """

    def __init__(
        self,
        benchmarks: list[str],
        data_dir: str | None = None,
        limit: int | None = None,
        k: int = 4,
        sampling: SamplingConfig = _TINA_EVAL_SAMPLING,
        every_n_train_steps: int | None = None,
        before: bool = True,
        strict: bool = True,
        out_dir: str | None = None,
        every_n_steps: int | None = None,
    ) -> None:
        self.names = list(benchmarks)
        self.data_dir = data_dir
        self.limit = limit
        self.k = k
        self.sampling = replace(sampling)
        self.every_n_train_steps = train_step_period("BenchmarkEval", every_n_train_steps, every_n_steps, 0)
        self.before = before
        self.strict = strict
        self.out_dir = out_dir
        self._benchmarks: list[Benchmark] | None = None
        self.history: list[tuple[int, EvalResult]] = []  # (optimizer step, result)
        self.seconds = 0.0  # wall time of this run's evaluations so far (logged as BENCH_SECONDS)

    def _load(self) -> list[Benchmark]:
        if self._benchmarks is None:
            self._benchmarks = load_benchmarks(self.names, data_dir=self.data_dir, limit=self.limit)
        return self._benchmarks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._load()  # fail on an unknown name or a missing file before any training time is spent

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> EvalResult:
        """Evaluate now and log at the current step. The training RNG stream is left untouched.

        Samples through `pl_module.sampler()` (the module's rollout source, as training does). Its wall time is
        added to the logged `BENCH_SECONDS` total, which CostTracker counts as evaluation."""
        sampler = getattr(pl_module, "sampler", None)
        if sampler is None:
            raise TypeError(f"BenchmarkEval evaluates a GRPOModule, not {type(pl_module).__name__}")
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            result = evaluate(
                sampler(), pl_module.tokenizer, self._load(), self.sampling, self.k, self.strict
            )
        self.seconds += time.perf_counter() - t0
        step = trainer.global_step
        self.history.append((step, result))
        metrics = result.metrics(prefix="bench")
        finite = {k: v for k, v in metrics.items() if not math.isnan(v)}
        if trainer.logger is not None:
            trainer.logger.log_metrics(finite, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in finite.items()})  # monitorable
        trainer.callback_metrics[BENCH_SECONDS] = torch.tensor(self.seconds, dtype=torch.float64)
        return result

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.before and not self.history:
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        every = self.every_n_train_steps
        if every and step % every == 0 and step < (trainer.max_steps or math.inf):
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history or self.history[-1][0] != trainer.global_step:
            self.run(trainer, pl_module)
        if self.out_dir:
            write_results(self.history[-1][1], Path(self.out_dir), label=f"step {trainer.global_step}")
        if trainer.is_global_zero:
            Console().print(self.summary_table())

    def summary_table(self) -> Table:
        """Before/after table: pass@1 ± standard error and pass@k per benchmark."""
        first_step, first = self.history[0]
        last_step, last = self.history[-1]
        table = Table(title=f"Benchmarks (k={self.k} samples per problem, strict={self.strict})")
        table.add_column("benchmark")
        table.add_column("problems", justify="right")
        table.add_column(f"pass@1 step {first_step}", justify="right")
        table.add_column(f"pass@1 step {last_step}", justify="right")
        table.add_column("change", justify="right")
        table.add_column(f"pass@{self.k} before → after", justify="right")
        for name, after in last.scores.items():
            before = first.scores[name]
            table.add_row(
                name,
                str(after.problems),
                percent(before.pass_at_1, before.stderr, decimals=1),
                percent(after.pass_at_1, after.stderr, decimals=1),
                f"{100 * (after.pass_at_1 - before.pass_at_1):+.1f}",
                f"{100 * before.pass_at.get(self.k, math.nan):.1f} → {100 * after.pass_at.get(self.k, math.nan):.1f}",
            )
        return table
