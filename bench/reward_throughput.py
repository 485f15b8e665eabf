"""Answer-checker throughput on MATH-500 reference solutions (completions per second per core).

Each reference solution is graded against its own gold (LaTeX mode, the accuracy reward's path), three ways:
in-process with no time limit (``grade.grade``, the floor: no isolation, no timeout), through the worker pool
with 1 process, and with ``--workers`` processes. ``--crossover`` also times batches of 1..128 on 1 vs
``--workers`` processes to find from which batch size the parallel path wins. Completions cycle through all 500
rows, and each completion's boxed answer gets a salt of ``\\!`` (removed by LaTeX normalization, so the maths is
unchanged) so that the checker's LRU caches of parsed answers never hit; the golds repeat, as in GRPO where
all completions of a prompt share one gold.

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


_SALT = [0]


def fresh(solutions: list[str], start: int, size: int) -> tuple[list[str], list[str]]:
    """``size`` (completion, gold) pairs from row ``start`` on, cycling; completions carry a new salt each call."""
    _SALT[0] += 1
    golds = [solutions[(start + i) % len(solutions)] for i in range(size)]
    return [salted(g, _SALT[0] % 64 + 1) for g in golds], golds


def rate(n: int, seconds: float) -> float:
    """Completions per second."""
    return n / seconds if seconds > 0 else float("inf")


def time_inprocess(solutions: list[str], strict: bool) -> float:
    """Seconds to grade every solution against itself in this process, one after another."""
    from lightning_tina.checker.grade import grade

    grade(solutions[0], solutions[0], "latex", strict)  # import math-verify outside the timing
    completions, golds = fresh(solutions, 0, len(solutions))
    t0 = time.perf_counter()
    for c, g in zip(completions, golds, strict=True):
        grade(c, g, "latex", strict)
    return time.perf_counter() - t0


def time_pool(solutions: list[str], strict: bool, workers: int) -> float:
    """Seconds for ``check_many`` on warm workers."""
    from lightning_tina.checker import check_many

    check_many(solutions[:workers], solutions[:workers], "latex", strict=strict, workers=workers)  # warm up
    completions, golds = fresh(solutions, 0, len(solutions))
    t0 = time.perf_counter()
    verdicts = check_many(completions, golds, "latex", strict=strict, workers=workers, timeout_s=30.0)
    seconds = time.perf_counter() - t0
    wrong = sum(not v.correct for v in verdicts)
    if wrong:
        print(f"note: {wrong} of {len(verdicts)} solutions not graded correct against their own gold")
    return seconds


def crossover(solutions: list[str], workers: int, repeats: int) -> list[dict[str, float]]:
    """Fastest of ``repeats`` timings per batch size on 1 vs ``workers`` processes (the minimum, because the
    machine is shared and noise only ever adds time)."""
    from lightning_tina.checker import check_many

    out, cursor = [], 0
    for size in (1, 2, 4, 8, 16, 32, 64, 128):
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
    parser.add_argument("--crossover", action="store_true", help="also time batch sizes 1..128, 1 vs N procs")
    parser.add_argument("--repeats", type=int, default=5, help="repeats per batch size in --crossover")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    solutions = load_math500(args.n)
    n, w = len(solutions), args.workers
    result: dict[str, object] = {"bench": "reward_throughput", "n": n, "workers": w, "cores": os.cpu_count()}
    print(f"{'mode':8} {'path':22} {'seconds':>8} {'compl/s':>8} {'compl/s/core':>13}")
    for strict in (True, False):
        label = "strict" if strict else "tina"
        for path, seconds, procs in (
            ("in-process, 1 thread", time_inprocess(solutions, strict), 1),
            ("pool, 1 process", time_pool(solutions, strict, 1), 1),
            (f"pool, {w} processes", time_pool(solutions, strict, w), w),
        ):
            r = rate(n, seconds)
            print(f"{label:8} {path:22} {seconds:8.2f} {r:8.1f} {r / procs:13.1f}")
            result[f"{label}/{path}"] = {
                "seconds": round(seconds, 3),
                "per_s": round(r, 2),
                "per_s_core": round(r / procs, 2),
            }
    if args.crossover:
        table = crossover(solutions, w, args.repeats)
        print(f"\n{'batch':>5} {'1 proc s':>9} {f'{w} procs s':>10} {'speedup':>8}")
        for row in table:
            print(f"{row['batch']:5d} {row['s_1proc']:9.3f} {row[f's_{w}proc']:10.3f} {row['speedup']:8.2f}")
        result["crossover"] = table
    print(json.dumps(result))


if __name__ == "__main__":
    main()
