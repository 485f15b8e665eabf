"""BenchmarkEval: scores the live policy on benchmarks before training, every N steps, and at the end of fit."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from lightning_tina.benchmarks import Benchmark, load_benchmarks
from lightning_tina.callbacks._period import train_step_period
from lightning_tina.cost import BENCH_SECONDS
from lightning_tina.evaluate import EvalResult, evaluate, evaluate_population, percent, write_results
from lightning_tina.population import SOLO
from lightning_tina.rollout.base import SamplingConfig

_TINA_EVAL_SAMPLING = SamplingConfig(max_new_tokens=96, temperature=0.6, top_p=0.95, seed=0)
"""Tina's evaluation protocol (temperature 0.6, top_p 0.95) with completions short enough for the tiny model."""


class BenchmarkEval(L.Callback):
    """Evaluate through the module's rollout source and log `bench/<name>/pass@1` and friends.

    A population (`model.population`) is scored per adapter, batched across adapters (see `run`): tags get the
    adapter's suffix (`bench/<name>/pass@1/<adapter>`), history is kept per adapter (`histories`), and the
    end-of-fit table has a column per adapter.

    Args:
        benchmarks: registry names (see lightning_tina.benchmarks), e.g. [tiny_heldout] or [aime24, math500].
        data_dir: local benchmark files (a folder laid out like shared/benchmarks); None loads from the hub.
        limit: keep the first `limit` problems of each benchmark (None: all).
        k: samples per problem; pass@1 is their mean, with its standard error, and pass@k is unbiased.
        sampling: the evaluation protocol (Tina: temperature 0.6, top_p 0.95; its max_new_tokens is 32,768).
        every_n_train_steps: also evaluate after every N optimizer steps (0: only before and after training).
        before: evaluate once before the first step, so the end-of-fit table shows before and after.
        strict: grade with the strict checker (True) or reproduce Tina's lenient lighteval verdicts (False).
        out_dir: if set, write results.json / results.md / samples.jsonl there after the last evaluation (a
            population: each adapter's into `out_dir/<name>/`).
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
        # per adapter ("default" in a solo run): (optimizer step, result) of every evaluation
        self.histories: dict[str, list[tuple[int, EvalResult]]] = {}
        self.shared_steps: list[int] = []  # steps of a population's shared evaluation (every adapter fresh)
        self.seconds = 0.0  # wall time of this run's evaluations so far (logged as BENCH_SECONDS)

    def _load(self) -> list[Benchmark]:
        if self._benchmarks is None:
            self._benchmarks = load_benchmarks(self.names, data_dir=self.data_dir, limit=self.limit)
        return self._benchmarks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._load()  # fail on an unknown name or a missing file before any training time is spent

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, EvalResult]:
        """Evaluate now and log at the current step; returns the result per adapter (a solo run: one, under the
        name "default"). The training RNG stream is left untouched.

        Samples through `pl_module.sampler()` (the module's rollout source, as training does). A population is
        scored by `evaluate_population` (one generate call per benchmark for every adapter) and logs each metric
        under each adapter's tag (`bench/<b>/pass@1/<name>`), also into `trainer.callback_metrics` so that
        AdapterCheckpoint can monitor it per adapter.

        Shared first evaluation: while every adapter's `lora_B` weights are all exactly zero (fresh LoRA adapters,
        i.e. before the first update), every adapter equals the base model exactly (a zero B adds exact zeros), so
        the policy is evaluated ONCE with whichever adapter is active and every adapter gets that result. Once any
        adapter has moved, each is evaluated through its own adapter.

        Its wall time is added to the logged `BENCH_SECONDS` total (one total for all adapters), which CostTracker
        counts as evaluation."""
        sampler = getattr(pl_module, "sampler", None)
        if sampler is None:
            raise TypeError(f"BenchmarkEval evaluates a GRPOModule, not {type(pl_module).__name__}")
        members = {m.name: m for m in pl_module.members}  # a solo run: one, "default", its tags unchanged
        names = list(pl_module.adapter_names)  # () for a solo run
        args = (sampler(), pl_module.tokenizer, self._load(), self.sampling, self.k, self.strict)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            if not names:
                results = {SOLO: evaluate(*args)}
            elif _all_fresh(trainer, pl_module.policy):
                # through the first adapter by name (a population engine needs one; any gives these numbers)
                shared = evaluate_population(*args[:5], names[:1], self.strict)[names[0]]
                self.shared_steps.append(trainer.global_step)
                results = {
                    n: replace(shared, config={**shared.config, "adapter": n, "shared": True}) for n in names
                }
            else:
                results = evaluate_population(*args[:5], names, self.strict)
        self.seconds += time.perf_counter() - t0
        step = trainer.global_step
        finite: dict[str, float] = {}
        for name, result in results.items():
            self.histories.setdefault(name, []).append((step, result))
            tag = members[name].metric
            finite.update({tag(k): v for k, v in result.metrics(prefix="bench").items() if not math.isnan(v)})
        if trainer.logger is not None:  # with the running evaluation time (bench scripts split phases by it)
            trainer.logger.log_metrics({**finite, BENCH_SECONDS: self.seconds}, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in finite.items()})  # monitorable
        trainer.callback_metrics[BENCH_SECONDS] = torch.tensor(self.seconds, dtype=torch.float64)
        return results

    @property
    def history(self) -> list[tuple[int, EvalResult]]:
        """(optimizer step, result) of every evaluation of a solo run (a population: of its first adapter; every
        adapter's is in `histories`)."""
        return next(iter(self.histories.values()), [])

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
            for name, history in self.histories.items():
                out = Path(self.out_dir) if name == SOLO else Path(self.out_dir) / name
                label = (
                    f"step {trainer.global_step}" if name == SOLO else f"{name} step {trainer.global_step}"
                )
                write_results(history[-1][1], out, label=label)
        if trainer.is_global_zero:
            _print(self.summary_table(), widen=SOLO not in self.histories)

    def summary_table(self) -> Table:
        """Before/after table: pass@1 ± standard error and pass@k per benchmark; a population: a column per
        adapter (`population_table`)."""
        if SOLO not in self.histories:
            return self.population_table()
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

    def population_table(self) -> Table:
        """A population's before/after table: a row per benchmark, a column per adapter. Each cell holds, one per
        line: pass@1 ± standard error before, after (→), the change in points, and pass@k before → after; narrow
        columns, so that 4-8 adapters fit side by side."""
        first_step, last_step = self.history[0][0], self.history[-1][0]
        table = Table(
            title=f"Benchmarks by adapter (k={self.k} samples per problem, strict={self.strict})",
            caption=f"each cell: pass@1 ± s.e. at step {first_step}, → at step {last_step}, change in points, "
            f"pass@{self.k} before → after",
            show_lines=True,
        )
        table.add_column("benchmark", no_wrap=True)
        for name in self.histories:
            table.add_column(name, justify="right", no_wrap=True)
        for bench, score in self.history[-1][1].scores.items():
            cells = []
            for history in self.histories.values():
                before, after = history[0][1].scores[bench], history[-1][1].scores[bench]
                cells.append(
                    f"{percent(before.pass_at_1, before.stderr, decimals=1)}\n"
                    f"→ {percent(after.pass_at_1, after.stderr, decimals=1)}\n"
                    f"{100 * (after.pass_at_1 - before.pass_at_1):+.1f}\n"
                    f"@{self.k} {100 * before.pass_at.get(self.k, math.nan):.1f}"
                    f"→{100 * after.pass_at.get(self.k, math.nan):.1f}"
                )
            table.add_row(f"{bench}\n{score.problems} problems", *cells)
        return table


def _print(table: Table, widen: bool) -> None:
    """Print `table`; `widen`: on a console at least as wide as the table (a population's columns stay unsqueezed
    where the terminal or a log file would otherwise be 80 columns)."""
    console = Console()
    if widen:
        need = Measurement.get(console, console.options.update_width(1000), table).maximum
        console = Console(width=max(console.width, need))
    console.print(table)


def _all_fresh(trainer: L.Trainer, policy: torch.nn.Module) -> bool:
    """True when every `lora_B` weight of every adapter is exactly zero (on every rank: FSDP2 shards agree)."""
    from torch.distributed.tensor import DTensor

    fresh = True
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            local = p.to_local() if isinstance(p, DTensor) else p
            if bool(local.detach().ne(0).any()):
                fresh = False
                break
    return bool(trainer.strategy.reduce_boolean_decision(fresh, all=True))
