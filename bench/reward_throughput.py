"""Answer-checker throughput on MATH-500 reference solutions (completions per second per core).

Each reference solution is graded against its own gold (LaTeX mode, the accuracy reward's path), three ways:
in-process with no time limit (``grade.grade``, the floor: no isolation, no timeout), through the worker pool
with 1 process, and with ``--workers`` processes. Two rates are reported: per wall-clock second, and per
CPU-second of the processes doing the grading (``/proc`` accounting), which is what one core delivers and does
not depend on how busy a shared machine is. ``--crossover`` also times batches of 1..256 on 1 vs ``--workers``
processes to find the batch size from which the parallel path wins.

Completions cycle through the rows, and each completion's boxed answer gets a salt of ``\\!`` (removed by LaTeX
normalization, so the maths is unchanged) so that the checker's caches of parsed answers never hit; the golds
repeat, as in GRPO where all completions of a prompt share one gold.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/reward_throughput.py [--n 500] [--workers 2] [--crossover]

Prints a short table and one JSON line (``{"bench": "reward_throughput", ...}``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
_SALT = [0]


def load_math500(limit: int) -> list[str]:
    """The first ``limit`` MATH-500 solutions (each is both completion and gold)."""
    path = BENCHMARKS / "math500.jsonl"
    if not path.exists():
        sys.exit(f"{path} not found: this benchmark needs the offline benchmark copies beside the repository")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["solution"] for r in rows[:limit]]


def salted(solution: str, salt: int) -> str:
    """The solution with ``salt`` copies of ``\\!`` at the start of its last box (same maths, new cache key)."""
    at = solution.rfind("\\boxed{")
    if at < 0:
        return solution
    at += len("\\boxed{")
    return solution[:at] + "\\!" * salt + solution[at:]


def fresh(solutions: list[str], start: int, size: int) -> tuple[list[str], list[str]]:
    """``size`` (completion, gold) pairs from row ``start`` on, cycling; completions carry a new salt each call."""
    _SALT[0] += 1
    golds = [solutions[(start + i) % len(solutions)] for i in range(size)]
    return [salted(g, _SALT[0] % 64 + 1) for g in golds], golds


def worker_cpu_seconds() -> float:
    """User + system CPU seconds used so far by the pool's idle worker processes."""
    from lightning_tina.checker.pool import get_pool

    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for w in get_pool()._idle:
        fields = Path(f"/proc/{w.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def run_inprocess(solutions: list[str], strict: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds) to grade every solution in this process, one after another."""
    from lightning_tina.checker.grade import grade

    grade(solutions[0], solutions[0], "latex", strict)  # import math-verify outside the timing
    completions, golds = fresh(solutions, 0, len(solutions))
    t0, c0 = time.perf_counter(), time.process_time()
    for c, g in zip(completions, golds, strict=True):
        grade(c, g, "latex", strict)
    return time.perf_counter() - t0, time.process_time() - c0


def run_pool(solutions: list[str], strict: bool, workers: int) -> tuple[float, float]:
    """(wall seconds, worker CPU seconds) for one ``check_many`` call on warm workers."""
    from lightning_tina.checker import check_many

    check_many(solutions[:workers], solutions[:workers], "latex", strict=strict, workers=workers)  # warm up
    completions, golds = fresh(solutions, 0, len(solutions))
    c0, t0 = worker_cpu_seconds(), time.perf_counter()
    verdicts = check_many(completions, golds, "latex", strict=strict, workers=workers, timeout_s=30.0)
    wall, cpu = time.perf_counter() - t0, worker_cpu_seconds() - c0
    wrong = sum(not v.correct for v in verdicts)
    if wrong:
        print(f"note: {wrong} of {len(verdicts)} solutions not graded correct against their own gold")
    return wall, cpu


def crossover(solutions: list[str], workers: int, repeats: int) -> list[dict[str, float]]:
    """Fastest of ``repeats`` wall-clock timings per batch size on 1 vs ``workers`` processes (the minimum,
    because the machine is shared and other load only ever adds time)."""
    from lightning_tina.checker import check_many

    out, cursor = [], 0
    for size in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        times: dict[int, list[float]] = {1: [], workers: []}
        for _ in range(repeats):
            for w in (1, workers):
                completions, golds = fresh(solutions, cursor, size)
                cursor += size
                t0 = time.perf_counter()
                check_many(completions, golds, "latex", strict=True, workers=w, timeout_s=30.0)
                times[w].append(time.perf_counter() - t0)
        one, many = min(times[1]), min(times[workers])
        out.append({"batch": size, "s_1proc": one, f"s_{workers}proc": many, "speedup": one / many})
    return out


def main() -> None:
    """Run the measurements and print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=500, help="MATH-500 solutions to grade (at most 500)")
    parser.add_argument("--workers", type=int, default=2, help="processes for the parallel measurement")
    parser.add_argument("--crossover", action="store_true", help="also time batch sizes 1..256, 1 vs N procs")
    parser.add_argument("--repeats", type=int, default=5, help="repeats per batch size in --crossover")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    solutions = load_math500(args.n)
    n, w = len(solutions), args.workers
    result: dict[str, object] = {"bench": "reward_throughput", "n": n, "workers": w, "cores": os.cpu_count()}
    result["loadavg_start"] = os.getloadavg()[0]
    print(
        f"{'mode':7} {'path':21} {'wall s':>7} {'compl/s':>8} {'compl/s/proc':>12} {'CPU s':>6} {'compl/CPU-s':>11}"
    )
    for strict in (True, False):
        label = "strict" if strict else "tina"
        for path, (wall, cpu), procs in (
            ("in-process, 1 thread", run_inprocess(solutions, strict), 1),
            ("pool, 1 process", run_pool(solutions, strict, 1), 1),
            (f"pool, {w} processes", run_pool(solutions, strict, w), w),
        ):
            per_s, per_cpu = n / wall, n / cpu if cpu > 0 else float("nan")
            print(
                f"{label:7} {path:21} {wall:7.2f} {per_s:8.1f} {per_s / procs:12.1f} {cpu:6.2f} {per_cpu:11.1f}"
            )
            result[f"{label}/{path}"] = {
                "wall_s": round(wall, 3),
                "per_s": round(per_s, 1),
                "per_s_per_proc": round(per_s / procs, 1),
                "cpu_s": round(cpu, 3),
                "per_cpu_s": round(per_cpu, 1),
            }
    if args.crossover:
        table = crossover(solutions, w, args.repeats)
        print(f"\n{'batch':>5} {'1 proc s':>9} {f'{w} procs s':>10} {'speedup':>8}")
        for row in table:
            print(f"{row['batch']:5d} {row['s_1proc']:9.3f} {row[f's_{w}proc']:10.3f} {row['speedup']:8.2f}")
        result["crossover"] = table
    result["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
