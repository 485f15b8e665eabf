"""bench/population.py: the summary of a population run against its members' solo runs (synthetic records, fast),
and the flags a member's solo run gets."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module("population")
    finally:
        sys.path.remove(str(ROOT / "bench"))


def _phases(rollout, reward, train, bench_eval, wall):
    return {
        "rollout_s": rollout,
        "reward_s": reward,
        "train_s": train,
        "bench_eval_s": bench_eval,
        "other_s": wall - rollout - reward - train - (bench_eval or 0.0),
    }


def _runs(pop_scores, solo_scores, bench_eval=5.0):
    """Two members a, b; per seed a population run and two solo runs with the given final pass@1 values."""
    runs = []
    for seed, (pa, pb) in enumerate(pop_scores):
        runs.append(
            {
                "seed": seed, "kind": "population", "member": None, "wall_s": 30.0, "peak_rss_mb": 900.0,
                "phases": _phases(12.0, 2.0, 8.0, bench_eval, 30.0),
                "pass1": {"a": [pa, 0.02], "b": [pb, 0.03]},
            }
        )  # fmt: skip
        for name, value, peak in (("a", solo_scores[seed][0], 600.0), ("b", solo_scores[seed][1], 750.0)):
            runs.append(
                {
                    "seed": seed, "kind": "solo", "member": name, "wall_s": 20.0, "peak_rss_mb": peak,
                    "phases": _phases(6.0, 1.0, 4.0, bench_eval, 20.0), "pass1": {name: [value, 0.02]},
                }
            )  # fmt: skip
    return runs


def test_ratios_and_phase_sums(bench):
    summary = bench.summarize(_runs([(0.5, 0.6)], [(0.5, 0.6)]), ["a", "b"])
    (seed,) = summary["per_seed"]
    assert seed["solos"]["wall_s"] == 40.0 and seed["solos"]["peak_rss_mb"] == 750.0
    assert seed["solos"]["phases"]["rollout_s"] == 12.0 and seed["solos"]["phases"]["bench_eval_s"] == 10.0
    assert seed["wall_ratio"] == pytest.approx(30 / 40)
    assert seed["memory_ratio"] == pytest.approx(900 / 750)
    assert summary["wall_ratio"] == pytest.approx(0.75) and summary["memory_ratio"] == pytest.approx(1.2)
    text = "\n".join(bench.report(summary))
    assert "wall 0.750" in text and "peak memory / largest solo 1.200" in text
    json.dumps(summary)  # the summary file is plain JSON


def test_one_seed_uses_the_evaluations_standard_error(bench):
    summary = bench.summarize(_runs([(0.50, 0.60)], [(0.45, 0.60)]), ["a", "b"])
    a = summary["pass1"]["a"]
    assert a["se"] == "eval" and a["seeds"] == 1
    assert a["diff"] == pytest.approx(0.05)
    assert a["se_diff"] == pytest.approx(math.hypot(0.02, 0.02))
    assert a["within_se"] is False  # 0.05 > 0.028
    assert summary["pass1"]["b"]["within_se"] is True


def test_several_seeds_use_the_spread_over_seeds(bench):
    pop = [(0.50, 0.6), (0.54, 0.6), (0.58, 0.6)]
    solo = [(0.48, 0.6), (0.50, 0.6), (0.52, 0.6)]
    summary = bench.summarize(_runs(pop, solo), ["a", "b"])
    a = summary["pass1"]["a"]
    assert a["se"] == "seeds" and a["seeds"] == 3
    assert a["population"]["mean"] == pytest.approx(0.54)
    assert a["population"]["se"] == pytest.approx(0.04 / math.sqrt(3))  # stdev 0.04 over 3 seeds
    assert a["solo"]["se"] == pytest.approx(0.02 / math.sqrt(3))
    assert a["se_diff"] == pytest.approx(math.hypot(0.04, 0.02) / math.sqrt(3))
    assert a["diff"] == pytest.approx(0.04) and a["within_se"] is False
    b = summary["pass1"]["b"]
    assert b["diff"] == pytest.approx(0.0) and b["se_diff"] == pytest.approx(0.0) and b["within_se"] is True
    assert [s["seed"] for s in summary["per_seed"]] == [0, 1, 2]


def test_missing_scores_and_missing_runs(bench):
    runs = _runs([(0.5, 0.6)], [(0.5, 0.6)], bench_eval=None)
    runs[1]["pass1"]["a"] = [None, None]  # a solo that logged no final score
    summary = bench.summarize(runs, ["a", "b"])
    assert summary["pass1"]["a"] is None and summary["pass1"]["b"] is not None
    assert summary["per_seed"][0]["solos"]["phases"]["bench_eval_s"] is None
    assert "(no final score logged)" in "\n".join(bench.report(summary))
    with pytest.raises(ValueError, match="one solo run per member"):
        bench.summarize(runs[:2], ["a", "b"])


def test_phases_from_scalars(bench):
    scalars = {
        "perf/rollout_s": [(1, 2.0), (2, 3.0)],
        "perf/reward_s": [(1, 0.5), (2, 0.5)],
        "perf/train_s": [(1, 1.0), (2, 2.0)],
        "time/bench_eval_s": [(0, 4.0), (2, 9.0)],  # a running total: the last one counts
        "bench/x/pass@1/a": [(0, 0.1), (2, 0.4)],
        "bench/x/pass@1_stderr/a": [(0, 0.01), (2, 0.02)],
        "bench/x/pass@1": [(2, 0.3)],
    }
    split = bench.phases(scalars, 20.0)
    assert split == {"rollout_s": 5.0, "reward_s": 1.0, "train_s": 3.0, "bench_eval_s": 9.0, "other_s": 2.0}
    assert bench.phases({}, 7.0)["other_s"] == 7.0 and bench.phases({}, 7.0)["bench_eval_s"] is None
    assert bench.final_pass1(scalars, "x", "a") == (0.4, 0.02)
    assert bench.final_pass1(scalars, "x", None) == (0.3, None)


def test_solo_flags_from_the_population_recipe(bench, tmp_path):
    base, members, flat = bench.read_population(ROOT / "configs/population/tiny_lr.yaml")
    assert base == ROOT / "configs/tiny.yaml"
    assert [m["name"] for m in members] == ["lr_5e-4", "lr_1e-3", "lr_2e-3", "lr_4e-3"]
    assert bench.member_flags(members[0]) == ["--model.optim.lr=0.0005"]
    assert bench.shared_flags(flat) == []  # only the logger name, which the script sets itself
    assert bench.member_flags({"name": "x", "lora": {"r": 8, "target_modules": ["q_proj"]}}) == [
        "--model.lora.r=8",
        '--model.lora.target_modules=["q_proj"]',
    ]
    (flag,) = bench.callbacks_flag(ROOT / "configs/population/tiny_lr.yaml", 16)
    callbacks = json.loads(flag.split("=", 1)[1])
    assert callbacks[0]["init_args"]["limit"] == 16 and len(callbacks) == 3
    assert bench.callbacks_flag(ROOT / "configs/population/tiny_lr.yaml", None) == []
    assert bench.benchmarks_of(ROOT / "configs/population/tiny_lr.yaml") == ["tiny_heldout"]
    recipe = tmp_path / "pop.yaml"
    recipe.write_text(
        f"config: {ROOT / 'configs/tiny.yaml'}\nrollout.vllm.weight_sync: lora\n"
        "trainer.logger.init_args.name: p\nmodel:\n  population:\n    - {name: a, lora: {r: 4}}\n"
    )
    _, members, flat = bench.read_population(recipe)
    assert members == [{"name": "a", "lora": {"r": 4}}]
    assert bench.shared_flags(flat) == ["--rollout.vllm.weight_sync=lora"]
