"""Cost accounting: the formulas, the train/eval split on a driven clock, and CostTracker in a real tiny fit."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from lightning_tina.callbacks.cost import CostTracker, cost_table
from lightning_tina.cost import BENCH_SECONDS, PhaseLedger, accelerator_hours, dollars, summarize

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "data" / "tiny"


class FakeClock:
    """A clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_hours_and_dollars():
    assert accelerator_hours(5400.0, 2) == 3.0  # 1.5 h on 2 accelerators
    assert dollars(3.0, 1.0) == 3.0  # Tina's $1 per L40S GPU-hour
    assert dollars(accelerator_hours(1800.0, 4), 2.5) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="devices"):
        accelerator_hours(1.0, 0)
    with pytest.raises(ValueError, match="wall_seconds"):
        accelerator_hours(-1.0, 1)
    with pytest.raises(ValueError, match="cost_per_gpu_hour"):
        dollars(1.0, -2.0)


def test_summary_splits_train_and_eval_like_tinas_table():
    s = summarize({"train": 7200.0, "eval": 1800.0}, devices=2, cost_per_gpu_hour=1.0)
    assert (s.train.hours, s.eval.hours, s.total.hours) == (4.0, 1.0, 5.0)
    assert (s.train.usd, s.eval.usd, s.total.usd) == (4.0, 1.0, 5.0)
    m = s.metrics()
    assert m["cost/train_usd"] == 4.0 and m["cost/eval_hours"] == 1.0 and m["cost/total_wall_s"] == 9000.0
    with pytest.raises(ValueError, match="unknown cost phases"):
        summarize({"rollout": 1.0}, devices=1, cost_per_gpu_hour=1.0)


def test_ledger_counts_nested_eval_once_and_the_rest_as_default():
    clock = FakeClock()
    ledger = PhaseLedger(default="train", clock=clock)
    ledger.start()
    clock.now = 10.0
    ledger.enter("eval")
    clock.now = 12.0
    ledger.enter("eval")  # nested: a benchmark inside a validation loop
    clock.now = 15.0
    ledger.exit("eval")
    assert ledger.elapsed() == {"train": 10.0, "eval": 5.0}
    clock.now = 20.0
    ledger.exit("eval")
    clock.now = 30.0
    ledger.stop()
    assert ledger.seconds == {"train": 20.0, "eval": 10.0}
    clock.now = 99.0  # stopped: nothing more accrues
    assert ledger.elapsed() == {"train": 20.0, "eval": 10.0}


def _trainer(tracker: CostTracker, world_size: int = 1, global_step: int = 0) -> SimpleNamespace:
    """What CostTracker reads of a Trainer."""
    return SimpleNamespace(
        world_size=world_size,
        callbacks=[tracker],
        logger=None,
        is_global_zero=False,
        global_step=global_step,
        callback_metrics={},
    )


def test_tracker_counts_benchmark_eval_and_validation_as_evaluation():
    """Benchmark time reaches CostTracker as a logged value (BenchmarkEval's BENCH_SECONDS), validation loops
    through their hooks: no callback calls or wraps another."""
    clock = FakeClock()
    tracker = CostTracker(cost_per_gpu_hour=2.0, extra_devices=1)
    tracker.ledger.clock = clock
    trainer = _trainer(tracker, world_size=2, global_step=3)
    tracker.setup(trainer, None, "fit")
    clock.now = 107.0  # training, with a 7 s benchmark evaluation inside it, which BenchmarkEval logs:
    trainer.callback_metrics[BENCH_SECONDS] = torch.tensor(7.0, dtype=torch.float64)
    clock.now = 150.0
    tracker.on_validation_start(trainer, None)
    clock.now = 160.0
    tracker.on_validation_end(trainer, None)
    clock.now = 200.0
    tracker.teardown(trainer, None, "fit")
    s = tracker.summary
    assert s.devices == 3  # 2 training processes + 1 extra accelerator
    assert (s.train.wall_seconds, s.eval.wall_seconds) == (183.0, 17.0)
    assert s.total.usd == pytest.approx(200.0 * 3 / 3600 * 2.0)
    assert "run" not in vars(tracker) and not hasattr(tracker, "_wrapped")


def test_validate_stage_is_all_evaluation():
    clock = FakeClock()
    tracker = CostTracker()
    tracker.ledger.clock = clock
    trainer = _trainer(tracker)
    tracker.setup(trainer, None, "validate")
    clock.now = 42.0
    tracker.teardown(trainer, None, "validate")
    assert (tracker.summary.train.wall_seconds, tracker.summary.eval.wall_seconds) == (0.0, 42.0)


def test_resumed_run_keeps_counting_from_the_checkpointed_seconds():
    clock = FakeClock()
    first = CostTracker()
    first.ledger.clock = clock
    trainer = _trainer(first)
    first.setup(trainer, None, "fit")
    clock.now = 30.0
    state = first.state_dict()  # what a checkpoint at t=30 holds
    second = CostTracker()
    second.ledger.clock = clock
    second.setup(trainer, None, "fit")  # the resumed job starts at t=30 ...
    second.load_state_dict(state)
    clock.now = 40.0  # ... and trains 10 s more
    second.teardown(trainer, None, "fit")
    assert second.summary.train.wall_seconds == 40.0


def test_bad_settings_are_refused_with_the_setting_named():
    with pytest.raises(ValueError, match="cost_per_gpu_hour"):
        CostTracker(cost_per_gpu_hour=-1.0)
    with pytest.raises(ValueError, match="extra_devices"):
        CostTracker(extra_devices=-1)


def test_table_has_training_evaluation_and_total_rows():
    table = cost_table(summarize({"train": 3600.0, "eval": 0.0}, devices=1, cost_per_gpu_hour=1.0))
    assert [c.header for c in table.columns][0] == "phase"
    assert list(table.columns[0].cells) == ["training", "evaluation", "total"]
    assert list(table.columns[3].cells) == ["$1.00", "$0.00", "$1.00"]


def test_tiny_fit_logs_cost_per_step_and_counts_benchmarks_as_evaluation(tmp_path):
    if not TINY.exists():
        pytest.skip(f"the embedded tiny model {TINY} is not built yet")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_tina.__main__ import cli_main

    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["trainer"].update(max_steps=2, enable_progress_bar=False, enable_model_summary=False)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    bench = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("BenchmarkEval"))
    bench["init_args"].update(limit=4, k=2, every_n_train_steps=1)
    cost = {
        "class_path": "lightning_tina.callbacks.cost.CostTracker",
        "init_args": {"cost_per_gpu_hour": 3.0},
    }
    cfg["trainer"]["callbacks"] = [bench, cost]
    cfg["model"]["grpo"].update(batch_size=8, micro_batch_size=8)
    cfg["rollout"]["sampling"]["max_new_tokens"] = 32
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = cli_main(["fit", "--config", str(path)])
    tracker = next(c for c in cli.trainer.callbacks if isinstance(c, CostTracker))
    s = tracker.summary
    assert s.train.wall_seconds > 0 and s.eval.wall_seconds > 0  # before, after step 1, and at the end
    assert s.total.usd == pytest.approx(s.total.wall_seconds / 3600 * 3.0)
    acc = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("cost/train_hours", "cost/eval_hours", "cost/train_usd", "cost/eval_usd", "cost/total_usd"):
        assert tag in tags, (tag, sorted(tags))
    steps = [e.step for e in acc.Scalars("cost/total_usd")]
    assert {1, 2} <= set(steps), steps  # logged every optimizer step (and once more at the end)
    assert acc.Scalars("cost/total_usd")[-1].value == pytest.approx(s.total.usd, rel=1e-5)
