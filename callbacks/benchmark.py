"""BenchmarkEval: scores the live policy on benchmarks before training, every N steps, and at the end of fit."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from rich.console import Console
from rich.table import Table

from lightning_tina.benchmarks import Benchmark, load_benchmarks
from lightning_tina.evaluate import EvalResult, evaluate, write_results
from lightning_tina.rollout.base import SamplingConfig

_TINA_EVAL_SAMPLING = SamplingConfig(max_new_tokens=96, temperature=0.6, top_p=0.95, seed=0)
"""Tina's evaluation protocol (temperature 0.6, top_p 0.95) with completions short enough for the tiny model."""


class BenchmarkEval(L.Callback):
    """Evaluate through the rollout engine (the one RolloutCallback owns) and log `bench/<name>/pass@1` and friends.

    Args:
        benchmarks: registry names (see lightning_tina.benchmarks), e.g. [tiny_heldout] or [aime24, math500].
        data_dir: local benchmark files (a folder laid out like shared/benchmarks); None loads from the hub.
        limit: keep the first `limit` problems of each benchmark (None: all).
        k: samples per problem; pass@1 is their mean, with its standard error, and pass@k is unbiased.
        sampling: the evaluation protocol (Tina: temperature 0.6, top_p 0.95; its max_new_tokens is 32,768).
        every_n_steps: also evaluate after every N optimizer steps (0: only before and after training).
        before: evaluate once before the first step, so the end-of-fit table shows before and after.
        strict: grade with the strict checker (True) or reproduce Tina's lenient lighteval verdicts (False).
        out_dir: if set, write results.json / results.md / samples.jsonl there after the last evaluation.
    """

    def __init__(
        self,
        benchmarks: list[str],
        data_dir: str | None = None,
        limit: int | None = None,
        k: int = 4,
        sampling: SamplingConfig = _TINA_EVAL_SAMPLING,
        every_n_steps: int = 0,
        before: bool = True,
        strict: bool = True,
        out_dir: str | None = None,
    ) -> None:
        self.names = list(benchmarks)
        self.data_dir = data_dir
        self.limit = limit
        self.k = k
        self.sampling = replace(sampling)
        self.every_n_steps = every_n_steps
        self.before = before
        self.strict = strict
        self.out_dir = out_dir
        self._benchmarks: list[Benchmark] | None = None
        self.history: list[tuple[int, EvalResult]] = []  # (optimizer step, result)

    def _load(self) -> list[Benchmark]:
        if self._benchmarks is None:
            self._benchmarks = load_benchmarks(self.names, data_dir=self.data_dir, limit=self.limit)
        return self._benchmarks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._load()  # fail on an unknown name or a missing file before any training time is spent

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> EvalResult:
        """Evaluate now and log at the current step. The training RNG stream is left untouched."""
        rollout = getattr(pl_module, "rollout", None)
        if rollout is None:
            raise RuntimeError(
                "BenchmarkEval needs lightning_tina.callbacks.RolloutCallback (the `rollout:` section)"
            )
        engine = rollout.current_engine(pl_module)
        with torch.random.fork_rng(devices=[]):
            result = evaluate(engine, pl_module.tokenizer, self._load(), self.sampling, self.k, self.strict)
        step = trainer.global_step
        self.history.append((step, result))
        metrics = result.metrics(prefix="bench")
        finite = {k: v for k, v in metrics.items() if not math.isnan(v)}
        if trainer.logger is not None:
            trainer.logger.log_metrics(finite, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in finite.items()})  # monitorable
        return result

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.before and not self.history:
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step < (trainer.max_steps or math.inf):
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
                _pct(before.pass_at_1, before.stderr),
                _pct(after.pass_at_1, after.stderr),
                f"{100 * (after.pass_at_1 - before.pass_at_1):+.1f}",
                f"{100 * before.pass_at.get(self.k, math.nan):.1f} → {100 * after.pass_at.get(self.k, math.nan):.1f}",
            )
        return table


def _pct(p: float, se: float) -> str:
    return f"{100 * p:.1f} ± {100 * se:.1f}" if not math.isnan(se) else f"{100 * p:.1f}"
