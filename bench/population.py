"""A population run against its members run one by one: wall time, peak memory, phases and final pass@1.

For each seed the script runs, each as a fresh subprocess `python -m lightning_tina fit ...` with its own TensorBoard
folder under --out:

- the population recipe (e.g. configs/population/tiny_lr.yaml: four learning rates of mini-Tina in one job);
- every member as a solo run, back to back: the population's base config (the file its `config:` line names, here
  configs/tiny.yaml) with the member's overrides as flags (`--model.optim.lr=0.0005`), the population file's other
  shared keys, and the same `seed_everything`.

Per run it records the wall seconds, the child's peak RSS (`os.wait4` on its pid: that process's own rusage), the
phase split from its TensorBoard events (sums of perf/rollout_s, perf/reward_s, perf/train_s, the last
time/bench_eval_s when logged, the rest = wall - those) and the final `bench/<b>/pass@1` (solo) or
`bench/<b>/pass@1/<name>` (population) with its standard error. It prints a table per seed (population against the
solos summed), the wall ratio population / sum of solos, the peak-memory ratio population / largest solo, and per
member the final pass@1 over seeds (mean and standard error over seeds) of population and solo, their difference
and whether it lies within the standard error of the difference. The summary goes to <out>/summary.json and to one
line with the prefix "JSON ".

    python bench/population.py --config configs/population/tiny_lr.yaml --seeds 0 1 2             # the measurement
    python bench/population.py --config configs/population/tiny_lr.yaml --seeds 0 --engine vllm
    python bench/population.py --seeds 0 --max-steps 2 --bench-limit 16 --out runs/pop_smoke       # does it run

With one seed there is no spread over seeds: the standard errors are then the evaluation's own (its binomial
standard error over problems), marked "se": "eval" in the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PHASES = ("rollout_s", "reward_s", "train_s", "bench_eval_s", "other_s")
VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine runs in the trainer's process (it sets this itself too)
    "TOKENIZERS_PARALLELISM": "false",
}
"""The environment of `--engine vllm` runs. The rest of what vLLM's CPU build needs is set by the engine itself:
eager mode (rollout.vllm.enforce_eager's CPU default) and the KV-cache size, passed as kv_cache_memory_bytes from
`--rollout.vllm.kv_cache_gib` (so VLLM_CPU_KVCACHE_SPACE is not read)."""

# ---- the recipes -------------------------------------------------------------------------------------------------


def _flatten(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a YAML mapping; dotted keys written in the file stay as they are."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and dotted not in ("model.population",):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def read_population(config: Path) -> tuple[Path, list[dict[str, Any]], dict[str, Any]]:
    """(base config, members, the population file's other keys as dotted keys) of a population recipe."""
    raw = yaml.safe_load(config.read_text()) or {}
    if "config" not in raw:
        raise ValueError(f"{config}: a population recipe names its base first (`config: ../tiny.yaml`)")
    base = (config.parent / raw.pop("config")).resolve()
    flat = _flatten(raw)
    members = flat.pop("model.population", None)
    if not members:
        raise ValueError(f"{config}: no model.population")
    return base, list(members), flat


def _value(value: Any) -> str:
    """A command-line value: YAML scalars as written, lists and mappings as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def member_flags(member: dict[str, Any]) -> list[str]:
    """The solo run's flags for a member: its `lora` and `optim` overrides (`--model.optim.lr=0.0005`)."""
    flags = []
    for section in ("lora", "optim"):
        for key, value in (member.get(section) or {}).items():
            flags.append(f"--model.{section}.{key}={_value(value)}")
    return flags


SOLO_ONLY = ("trainer.logger.", "checkpoint.")
"""Keys of the population file that the solo runs do not take (where they log and save is set by the script)."""


def shared_flags(flat: dict[str, Any]) -> list[str]:
    """The population file's other settings, which the solo runs share (e.g. rollout.vllm.weight_sync)."""
    return [f"--{k}={_value(v)}" for k, v in flat.items() if not k.startswith(SOLO_ONLY)]


def resolved_callbacks(config: Path) -> list[dict[str, Any]] | None:
    """`trainer.callbacks` as the recipe's `config:` chain gives it (the last file that sets it wins)."""
    raw = yaml.safe_load(config.read_text()) or {}
    if "trainer.callbacks" in raw:
        return raw["trainer.callbacks"]
    if isinstance(raw.get("trainer"), dict) and "callbacks" in raw["trainer"]:
        return raw["trainer"]["callbacks"]
    if "config" in raw:
        return resolved_callbacks((config.parent / raw["config"]).resolve())
    return None


def callbacks_flag(config: Path, bench_limit: int | None) -> list[str]:
    """`--trainer.callbacks=[...]` with BenchmarkEval's `limit` set (nothing when no limit is asked for)."""
    if bench_limit is None:
        return []
    callbacks = resolved_callbacks(config)
    if not callbacks:
        raise ValueError(f"{config}: no trainer.callbacks to set BenchmarkEval's limit in")
    out = []
    for cb in callbacks:
        cb = json.loads(json.dumps(cb))
        if cb["class_path"].rsplit(".", 1)[-1] == "BenchmarkEval":
            cb.setdefault("init_args", {})["limit"] = bench_limit
        out.append(cb)
    return [f"--trainer.callbacks={json.dumps(out)}"]


def benchmarks_of(config: Path) -> list[str]:
    """The benchmarks that BenchmarkEval scores in this recipe."""
    for cb in resolved_callbacks(config) or []:
        if cb["class_path"].rsplit(".", 1)[-1] == "BenchmarkEval":
            return list(cb.get("init_args", {}).get("benchmarks", []))
    return []


# ---- one run -----------------------------------------------------------------------------------------------------


def run_child(cmd: Sequence[str], env: dict[str, str], log: Path) -> tuple[float, float, int]:
    """Run `cmd`; (wall seconds, peak RSS in MB of that child, exit status). ru_maxrss is in KiB on Linux."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        t0 = time.perf_counter()
        child = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    return wall, usage.ru_maxrss / 1024, child.returncode


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard events under `logdir`: tag -> [(step, value)] in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(logdir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(values, key=lambda sv: sv[0]) for tag, values in out.items()}


def phases(scalars: dict[str, list[tuple[int, float]]], wall: float) -> dict[str, float | None]:
    """Seconds per phase of one run: summed perf/* per step, the last time/bench_eval_s (a running total; None
    when the run did not log it, then evaluation is inside `other_s`), and the rest of the wall time."""

    def total(tag: str) -> float:
        return float(sum(v for _, v in scalars.get(tag, [])))

    split: dict[str, float | None] = {
        "rollout_s": total("perf/rollout_s"),
        "reward_s": total("perf/reward_s"),
        "train_s": total("perf/train_s"),
    }
    bench = scalars.get("time/bench_eval_s")
    split["bench_eval_s"] = float(bench[-1][1]) if bench else None
    split["other_s"] = wall - sum(v for v in split.values() if v is not None)
    return split


def final_pass1(
    scalars: dict[str, list[tuple[int, float]]], benchmark: str, member: str | None
) -> tuple[float | None, float | None]:
    """(pass@1, its standard error) at the last evaluation; `member` suffixes the tags of a population."""

    def last(tag: str) -> float | None:
        values = scalars.get(tag if member is None else f"{tag}/{member}")
        return float(values[-1][1]) if values else None

    return last(f"bench/{benchmark}/pass@1"), last(f"bench/{benchmark}/pass@1_stderr")


# ---- the summary (pure: tests/test_bench_population.py) ---------------------------------------------------------


def _mean_se(values: Sequence[float], eval_ses: Sequence[float | None]) -> tuple[float, float | None, str]:
    """(mean, its standard error, where the error comes from): over seeds with 2+ values, else the evaluation's."""
    mean = statistics.fmean(values)
    if len(values) > 1:
        return mean, statistics.stdev(values) / math.sqrt(len(values)), "seeds"
    se = eval_ses[0] if eval_ses else None
    return mean, se, "eval"


def summarize(runs: Iterable[dict[str, Any]], members: Sequence[str]) -> dict[str, Any]:
    """The comparison from the records of the runs.

    A record: {"seed", "kind": "population" | "solo", "member" (solo only), "wall_s", "peak_rss_mb",
    "phases": {phase: seconds or None}, "pass1": {member: [value, stderr]}} (a solo's pass1 names its member)."""
    runs = list(runs)
    seeds = sorted({r["seed"] for r in runs})
    per_seed = []
    for seed in seeds:
        pop = [r for r in runs if r["seed"] == seed and r["kind"] == "population"]
        solos = {r["member"]: r for r in runs if r["seed"] == seed and r["kind"] == "solo"}
        if len(pop) != 1 or set(solos) != set(members):
            raise ValueError(
                f"seed {seed}: need one population run and one solo run per member {list(members)}"
            )
        p = pop[0]
        solo_phases = {}
        for phase in PHASES:
            values = [s["phases"].get(phase) for s in solos.values()]
            solo_phases[phase] = None if any(v is None for v in values) else sum(values)
        solo_wall = sum(s["wall_s"] for s in solos.values())
        solo_peak = max(s["peak_rss_mb"] for s in solos.values())
        per_seed.append(
            {
                "seed": seed,
                "population": {"wall_s": p["wall_s"], "peak_rss_mb": p["peak_rss_mb"], "phases": p["phases"]},
                "solos": {"wall_s": solo_wall, "peak_rss_mb": solo_peak, "phases": solo_phases},
                "wall_ratio": p["wall_s"] / solo_wall,
                "memory_ratio": p["peak_rss_mb"] / solo_peak,
            }
        )
    quality = {}
    for name in members:
        pops = [r["pass1"][name] for r in runs if r["kind"] == "population"]
        sols = [r["pass1"][name] for r in runs if r["kind"] == "solo" and r["member"] == name]
        if any(v is None or v[0] is None for v in pops + sols):
            quality[name] = None  # a run without the benchmark's final score
            continue
        pm, pse, psrc = _mean_se([v[0] for v in pops], [v[1] for v in pops])
        sm, sse, ssrc = _mean_se([v[0] for v in sols], [v[1] for v in sols])
        se_diff = math.sqrt(pse**2 + sse**2) if pse is not None and sse is not None else None
        diff = pm - sm
        quality[name] = {
            "population": {"mean": pm, "se": pse},
            "solo": {"mean": sm, "se": sse},
            "diff": diff,
            "se_diff": se_diff,
            "within_se": None if se_diff is None else abs(diff) <= se_diff,
            "se": psrc if psrc == ssrc else f"{psrc}/{ssrc}",
            "seeds": len(pops),
        }
    walls = [s["wall_ratio"] for s in per_seed]
    mems = [s["memory_ratio"] for s in per_seed]
    return {
        "seeds": seeds,
        "members": list(members),
        "per_seed": per_seed,
        "wall_ratio": statistics.fmean(walls),
        "memory_ratio": statistics.fmean(mems),
        "pass1": quality,
    }


def _s(value: float | None, fmt: str = "8.1f") -> str:
    return format(value, fmt) if value is not None else f"{'-':>{len(format(0.0, fmt))}}"


def report(summary: dict[str, Any]) -> list[str]:
    """The printed tables of a summary."""
    lines = []
    for s in summary["per_seed"]:
        lines.append(f"seed {s['seed']}: population vs the {len(summary['members'])} solo runs summed")
        lines.append(f"  {'':<12}{'wall s':>9}{'peak MB':>9}" + "".join(f"{p:>14}" for p in PHASES))
        for label in ("population", "solos"):
            row = s[label]
            lines.append(
                f"  {label:<12}{row['wall_s']:9.1f}{row['peak_rss_mb']:9.0f}"
                + "".join(f"{_s(row['phases'][p], '14.1f')}" for p in PHASES)
            )
        lines.append(
            f"  population / solos: wall {s['wall_ratio']:.3f}, peak memory / largest solo {s['memory_ratio']:.3f}"
        )
    lines.append(
        f"mean over seeds: wall ratio {summary['wall_ratio']:.3f}, peak memory ratio {summary['memory_ratio']:.3f}"
    )
    lines.append("final pass@1 (%) per member: mean ± SE over seeds (one seed: the evaluation's SE)")
    lines.append(f"  {'member':<14}{'population':>16}{'solo':>16}{'diff':>9}{'SE diff':>9}  within SE")
    for name, q in summary["pass1"].items():
        if q is None:
            lines.append(f"  {name:<14} (no final score logged)")
            continue
        pop, solo = q["population"], q["solo"]
        lines.append(
            f"  {name:<14}{100 * pop['mean']:9.1f} ± {_s(pop['se'] and 100 * pop['se'], '4.1f')}"
            f"{100 * solo['mean']:9.1f} ± {_s(solo['se'] and 100 * solo['se'], '4.1f')}"
            f"{100 * q['diff']:+9.1f}{_s(q['se_diff'] and 100 * q['se_diff'], '9.1f')}  "
            f"{'-' if q['within_se'] is None else ('yes' if q['within_se'] else 'no')}"
        )
    return lines


# ---- the orchestrator --------------------------------------------------------------------------------------------


def _fit(config: Path, flags: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "lightning_tina", "fit", "--config", str(config), *flags]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs/population/tiny_lr.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="trainer.max_steps (default: the recipe's)"
    )
    parser.add_argument("--bench-limit", type=int, default=None, help="BenchmarkEval's limit (problems)")
    parser.add_argument(
        "--vllm-weight-sync",
        choices=("auto", "lora"),
        default="auto",
        help="--engine vllm: auto = each side's default (solo on CPU: merged; population: lora); lora = both lora",
    )
    parser.add_argument(
        "--kv-cache-gib", type=float, default=0.5, help="--engine vllm: rollout.vllm.kv_cache_gib"
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_population")
    args = parser.parse_args(argv)

    config = args.config.resolve()
    base, members, flat = read_population(config)
    names = [m["name"] for m in members]
    benchmarks = benchmarks_of(config)
    if not benchmarks:
        raise SystemExit(f"{config}: no BenchmarkEval callback, so no final pass@1 to compare")
    benchmark = benchmarks[0]
    for m in members:
        if m.get("seed") is not None:
            print(
                f"note: member {m['name']} sets seed {m['seed']}; its solo run cannot (it uses seed_everything)"
            )

    common = ["--trainer.enable_progress_bar=false", *callbacks_flag(config, args.bench_limit)]
    if args.max_steps is not None:
        common.append(f"--trainer.max_steps={args.max_steps}")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if args.engine == "vllm":
        env.update(VLLM_ENV)
        common += ["--rollout.engine=vllm", f"--rollout.vllm.kv_cache_gib={args.kv_cache_gib}"]
        if args.vllm_weight_sync == "lora":
            common.append("--rollout.vllm.weight_sync=lora")

    runs = []
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        jobs = [("population", None, _fit(config, []))]
        jobs += [("solo", m["name"], _fit(base, [*shared_flags(flat), *member_flags(m)])) for m in members]
        for kind, member, cmd in jobs:
            name = "population" if member is None else f"solo_{member}"
            logdir = args.out / f"seed{seed}" / name
            shutil.rmtree(logdir, ignore_errors=True)  # a rerun replaces its own folder, nothing else
            cmd = [
                *cmd,
                *common,
                f"--seed_everything={seed}",
                f"--trainer.logger.init_args.save_dir={logdir.parent}",
                f"--trainer.logger.init_args.name={name}",
                "--trainer.logger.init_args.version=0",
            ]
            print(f"seed {seed}: {name} ...", flush=True)
            wall, peak_mb, status = run_child(cmd, env, logdir / "stdout.log")
            if status != 0:
                tail = (logdir / "stdout.log").read_text()[-3000:]
                raise SystemExit(f"{name} (seed {seed}) failed with status {status}:\n{tail}")
            scalars = read_scalars(logdir)
            pass1 = (
                {n: list(final_pass1(scalars, benchmark, n)) for n in names}
                if member is None
                else {member: list(final_pass1(scalars, benchmark, None))}
            )
            record = {
                "seed": seed,
                "kind": kind,
                "member": member,
                "wall_s": wall,
                "peak_rss_mb": peak_mb,
                "phases": phases(scalars, wall),
                "pass1": pass1,
                "command": cmd[1:],
            }
            runs.append(record)
            print(f"  wall {wall:.1f} s, peak RSS {peak_mb:.0f} MB", flush=True)

    summary = summarize(runs, names)
    summary.update(
        config=str(config.relative_to(REPO)) if config.is_relative_to(REPO) else str(config),
        base=str(base.relative_to(REPO)) if base.is_relative_to(REPO) else str(base),
        engine=args.engine,
        benchmark=benchmark,
        max_steps=args.max_steps,
        bench_limit=args.bench_limit,
        runs=runs,
    )
    print("\n".join(report(summary)))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("JSON " + json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
