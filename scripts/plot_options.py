"""Compare GRPO runs from their TensorBoard logs: held-out pass@1 against training minutes, with rollout tokens.

    python scripts/plot_options.py --runs runs/compare --out docs/rl_options.png

`--runs` is a folder of TensorBoard runs laid out `<arm>/<seed>/...` (e.g. `grpo/seed1/version_0`): the first level
names the arm, everything under it is one run per event-file folder. For each run it reads:
- `bench/tiny_heldout/pass@1` (BenchmarkEval's held-out score; `--metric` picks another),
- `perf/rollout_s + perf/reward_s + perf/train_s` per step: the minutes spent in training steps, summed (evaluation
  excluded, so that an arm is not charged for evaluating more often),
- `train/rollout_tokens` per step: completion tokens generated (with dynamic sampling, refill rounds included).

It prints a Markdown table (per arm: steps, training minutes, rollout tokens, pass@1 at the common time budget,
mean and spread over seeds) and, with `--out`, draws pass@1 against minutes (one thin line per seed, a thick mean
per arm). The figure needs matplotlib (`pip install -e ".[bench]"`); the table does not.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

STEP_TIMES = ("perf/rollout_s", "perf/reward_s", "perf/train_s")


@dataclass
class Run:
    """One run's curve: pass@1 at training minutes, and its totals."""

    arm: str
    name: str
    minutes: list[float]  # training minutes at each evaluation
    score: list[float]  # the metric at each evaluation
    steps: int  # optimizer steps done
    train_minutes: float  # training minutes in all
    rollout_tokens: float  # completion tokens generated in all


def _scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the event files in `folder`: tag -> {step: value} (the last value of a step wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def read_run(folder: Path, arm: str, metric: str) -> Run:
    """The curve of the run whose event files are in `folder`."""
    tags = _scalars(folder)
    if metric not in tags:
        raise ValueError(
            f"{folder}: no {metric!r} scalar; the run needs BenchmarkEval (tags: {sorted(tags)})"
        )
    steps = sorted(set().union(*(tags.get(t, {}) for t in STEP_TIMES)))
    elapsed, total = {0: 0.0}, 0.0  # training minutes after each step
    for step in steps:
        total += sum(tags.get(t, {}).get(step, 0.0) for t in STEP_TIMES) / 60
        elapsed[step + 1] = total  # a step logs at its index; evaluations log at the steps done
    done = sorted(elapsed)
    evals = sorted(tags[metric].items())
    minutes = [elapsed[max(s for s in done if s <= step)] for step, _ in evals]
    tokens = sum(tags.get("train/rollout_tokens", {}).values())
    return Run(arm, folder.name, minutes, [v for _, v in evals], len(steps), total, tokens)


def read_runs(root: Path, metric: str) -> list[Run]:
    """All runs under `root`/<arm>/, each folder with event files one run."""
    runs = []
    for arm in sorted(p for p in root.iterdir() if p.is_dir()):
        for folder in sorted({e.parent for e in arm.rglob("events.out.tfevents.*")}):
            run = read_run(folder, arm.name, metric)
            run.name = str(folder.relative_to(arm))
            runs.append(run)
    if not runs:
        raise ValueError(f"no TensorBoard event files under {root}/<arm>/")
    return runs


def score_at(run: Run, minutes: float) -> float:
    """The metric of the last evaluation at or before `minutes` of training."""
    return [s for m, s in zip(run.minutes, run.score, strict=True) if m <= minutes + 1e-9][-1]


def _mean_sd(values: Sequence[float], digits: int = 3) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def table(runs: list[Run], budget: float) -> str:
    """Markdown: per arm, means ± standard deviations over its runs, at `budget` training minutes."""
    lines = [
        f"| arm | runs | steps | training min | rollout tokens (M) | tokens / step | pass@1 start | "
        f"pass@1 at {budget:.1f} min | pass@1 end |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm in sorted({r.arm for r in runs}):
        mine = [r for r in runs if r.arm == arm]
        per_step = [r.rollout_tokens / max(r.steps, 1) for r in mine]
        lines.append(
            f"| {arm} | {len(mine)} | {_mean_sd([r.steps for r in mine], 0)} | "
            f"{_mean_sd([r.train_minutes for r in mine], 2)} | {_mean_sd([r.rollout_tokens / 1e6 for r in mine])} | "
            f"{statistics.mean(per_step):.0f} | "
            f"{_mean_sd([r.score[0] for r in mine])} | {_mean_sd([score_at(r, budget) for r in mine])} | "
            f"{_mean_sd([r.score[-1] for r in mine])} |"
        )
    return "\n".join(lines)


def plot(runs: list[Run], out: Path, metric: str, budget: float) -> None:
    """pass@1 against training minutes: thin lines per run, a thick step mean per arm. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit('the figure needs matplotlib: pip install -e ".[bench]" (or omit --out)') from None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    grid = [budget * i / 100 for i in range(101)]  # [101] minutes
    for color, arm in zip(
        ("tab:blue", "tab:orange", "tab:green", "tab:red"), sorted({r.arm for r in runs}), strict=False
    ):
        mine = [r for r in runs if r.arm == arm]
        for r in mine:
            ax.step(r.minutes, r.score, where="post", color=color, alpha=0.3, linewidth=0.8)
        mean = [statistics.mean(score_at(r, t) for r in mine) for t in grid]
        ax.plot(grid, mean, color=color, linewidth=2.2, label=f"{arm} (mean of {len(mine)})")
    ax.set_xlabel("training minutes (evaluation excluded)")
    ax.set_ylabel(metric)
    ax.set_xlim(0, budget)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="folder of <arm>/<run>/ TensorBoard logs")
    parser.add_argument("--metric", default="bench/tiny_heldout/pass@1")
    parser.add_argument(
        "--budget", type=float, default=None, help="training minutes (default: the shortest run)"
    )
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (needs matplotlib)")
    args = parser.parse_args(argv)
    runs = read_runs(args.runs, args.metric)
    budget = args.budget if args.budget is not None else min(r.minutes[-1] for r in runs)
    print(table(runs, budget))
    if args.out is not None:
        plot(runs, args.out, args.metric, budget)


if __name__ == "__main__":
    main()
