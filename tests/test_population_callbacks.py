"""BenchmarkEval and AdapterCheckpoint with a population (`model.population`), and evaluation batched across adapters.

On data/tiny with two adapters: `evaluate_population` equals a solo `evaluate` per adapter under greedy sampling;
a short fit logs every benchmark metric per adapter, evaluates once for all adapters while they are fresh (step 0)
and per adapter afterwards, prints a column per adapter and writes each adapter's results and checkpoints into its
own folder; checkpoints load with PEFT, equal the trained weights, and are pruned per adapter.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_tina.benchmarks import load_benchmarks
from lightning_tina.callbacks import AdapterCheckpoint, BenchmarkEval, RolloutCallback
from lightning_tina.evaluate import evaluate, evaluate_population
from lightning_tina.grpo import GRPOSettings
from lightning_tina.module import GRPOModule
from lightning_tina.optim import OptimSettings
from lightning_tina.policy import LoRASettings
from lightning_tina.population import AdapterSettings, activate
from lightning_tina.rewards import RewardSpec, register_reward
from lightning_tina.rollout.base import SamplingConfig
from lightning_tina.rollout.source import EngineRollouts
from lightning_tina.rollout.vllm import VLLMConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "data" / "tiny")
pytestmark = pytest.mark.skipif(not (ROOT / "data" / "tiny" / "config.json").is_file(), reason="no data/tiny")

A, B = "lr_1e-2", "lr_5e-3"
PASS1 = "bench/tiny_heldout/pass@1"


@register_reward("test_population_alternating")
def _alternating(completions: list[str], **_) -> list[float | None]:
    """0, 1, 0, 1 within every group (a call sees one group): never a zero advantage, so each adapter's first
    update moves its lora_B off zero."""
    return [float(i % 2) for i in range(len(completions))]


def _module() -> GRPOModule:
    m = GRPOModule(
        model=TINY,
        lora=LoRASettings(r=4, alpha=8, dropout=0.0),
        grpo=GRPOSettings(num_generations=4, batch_size=8, micro_batch_size=8),
        optim=OptimSettings(lr=1e-2, warmup_ratio=0.0),
        rewards=[RewardSpec("accuracy"), RewardSpec("test_population_alternating")],
        population=[
            AdapterSettings(A, optim={"lr": 1e-2}),
            AdapterSettings(B, lora={"r": 8}, optim={"lr": 5e-3}),
        ],
    )
    m.configure_model()
    return m


def _randomize(m: GRPOModule, seed: int = 0) -> None:
    """Non-zero lora_B weights, different per adapter, so that the adapters' greedy outputs differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def population() -> GRPOModule:
    m = _module()
    _randomize(m)
    m.connect_rollouts(EngineRollouts("hf", SamplingConfig(), 4, VLLMConfig()))
    return m


def test_population_evaluation_equals_each_adapter_evaluated_alone(population: GRPOModule) -> None:
    benches = load_benchmarks(["tiny_heldout"], limit=4)
    greedy = SamplingConfig(max_new_tokens=20, temperature=0.0, seed=3)
    calls: list[object] = []
    source = population.rollout_source
    generate = source.generate

    def spy(prompt_ids, n, sampling, policy, adapters=None):
        calls.append(adapters)
        return generate(prompt_ids, n, sampling, policy, adapters)

    source.generate = spy
    try:
        both = evaluate_population(population.sampler(), population.tokenizer, benches, greedy, 1, [A, B])
        alone = {}
        for name in (A, B):
            activate(population.policy, name)
            alone[name] = evaluate(population.sampler(), population.tokenizer, benches, greedy, 1)
        activate(population.policy, A)
    finally:
        del source.generate
    assert calls[0] == [A] * 4 + [B] * 4 and calls[1:] == [None, None]  # one call for both adapters
    for name in (A, B):
        assert [r["completion"] for r in both[name].records] == [r["completion"] for r in alone[name].records]
        assert both[name].scores == alone[name].scores
        assert both[name].config["adapter"] == name and {r["adapter"] for r in both[name].records} == {name}
    assert [r["completion"] for r in alone[A].records] != [r["completion"] for r in alone[B].records]


def test_checkpoints_per_adapter_load_equal_the_weights_and_prune_per_adapter(
    population: GRPOModule, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = AdapterCheckpoint(
        dirpath=str(tmp_path), every_n_train_steps=1, keep_last=1, monitor=PASS1, keep_best=1
    )
    values = {1: (0.9, 0.1), 2: (0.1, 0.8), 3: (0.2, 0.2)}  # best: A at step 1, B at step 2
    for step, (a, b) in values.items():
        metrics = {f"{PASS1}/{A}": a, f"{PASS1}/{B}": b, f"train/reward/{A}": 1.0, "time/bench_eval_s": 2.0}
        trainer = SimpleNamespace(
            global_step=step,
            is_global_zero=True,
            callback_metrics={k: torch.tensor(v) for k, v in metrics.items()},
            strategy=SimpleNamespace(barrier=lambda: None),
        )
        ckpt.save(trainer, population)  # type: ignore[arg-type]
    kept = {n: sorted(p.name for p in (tmp_path / n).iterdir()) for n in (A, B)}
    assert kept == {
        A: ["step-000001", "step-000003"],
        B: ["step-000002", "step-000003"],
    }  # no temporary folders
    approx = pytest.approx
    assert ckpt.histories == {
        A: [(1, approx(0.9)), (3, approx(0.2))],
        B: [(2, approx(0.8)), (3, approx(0.2))],
    }

    folder = tmp_path / B / "step-000003"
    meta = json.loads((folder / "lightning_tina.json").read_text())
    assert meta["step"] == 3 and meta["adapter"] == B
    assert meta["metrics"] == {PASS1: pytest.approx(0.2), "time/bench_eval_s": 2.0}  # its own, and shared
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY), str(folder))
    theirs = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    mine = {
        n.replace(f".{B}.", ".default."): p for n, p in population.policy.named_parameters() if f".{B}." in n
    }
    assert theirs.keys() == mine.keys() and theirs
    assert all(torch.equal(theirs[n], mine[n].detach()) for n in mine)

    again = AdapterCheckpoint(monitor=PASS1)
    again.load_state_dict(
        json.loads(json.dumps(ckpt.state_dict()))
    )  # through plain lists, as a checkpoint may
    assert again.histories == ckpt.histories and again.saved == []
    solo = AdapterCheckpoint()
    solo.load_state_dict({"saved": [[20, 0.5], [40, None]]})  # a solo checkpoint's state, before populations
    assert solo.saved == [(20, 0.5), (40, None)] and solo.state_dict() == {
        "saved": [(20, 0.5), (40, None)],
        "saved_by_adapter": {},
    }


def test_fit_logs_per_adapter_shares_the_fresh_evaluation_and_writes_per_adapter(tmp_path: Path) -> None:
    import lightning as L
    from rich.console import Console

    from lightning_tina.datamodule import ReasoningDataModule

    m = _module()
    adapters_seen: list[object] = []
    bench = BenchmarkEval(
        ["tiny_heldout"],
        limit=4,
        k=2,
        sampling=SamplingConfig(max_new_tokens=16, temperature=0.6, top_p=0.95, seed=0),
        out_dir=str(tmp_path / "bench"),
    )
    ckpt = AdapterCheckpoint(
        dirpath=str(tmp_path / "adapters"), every_n_train_steps=1, keep_last=1, monitor=PASS1
    )
    rollout = RolloutCallback(engine="hf", num_generations=4, sampling=SamplingConfig(max_new_tokens=16))
    generate = rollout.source.generate

    def spy(prompt_ids, n, sampling, policy, adapters=None):
        if sampling is not rollout.sampling:  # evaluation calls only
            adapters_seen.append(adapters)
        return generate(prompt_ids, n, sampling, policy, adapters)

    rollout.source.generate = spy
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        callbacks=[rollout, bench, ckpt],  # AdapterCheckpoint is the Checkpoint callback
        default_root_dir=tmp_path,
    )
    trainer.fit(m, datamodule=ReasoningDataModule(tokenizer=TINY, prompts_per_step=2, val_source=None))

    assert all(
        p.abs().sum() > 0 for n, p in m.policy.named_parameters() if "lora_B" in n
    )  # both adapters moved
    # step 0: every adapter fresh, one evaluation for all; after training: one batched call per benchmark
    assert bench.shared_steps == [0]
    assert adapters_seen == [[A] * 4, [A] * 4 + [B] * 4]  # the shared one through the first adapter
    assert list(bench.histories) == [A, B]
    assert [s for s, _ in bench.histories[A]] == [s for s, _ in bench.histories[B]] == [0, 2]
    assert bench.histories[A][0][1].scores == bench.histories[B][0][1].scores
    for name in (A, B):
        for key in (PASS1, "bench/tiny_heldout/pass@2", "bench/avg/pass@1"):
            value = trainer.callback_metrics[f"{key}/{name}"]
            assert float(value) == pytest.approx(bench.histories[name][-1][1].metrics()[key])
        results = json.loads((tmp_path / "bench" / name / "results.json").read_text())
        assert results["average_pass_at_1"] == bench.histories[name][-1][1].average
        # monitored by its own tag: steps 1 and 2 both saw the step-0 score (the step-2 evaluation runs at the end)
        first = bench.histories[name][0][1].scores["tiny_heldout"].pass_at_1
        assert ckpt.histories[name] == [(1, pytest.approx(first)), (2, pytest.approx(first))]
        assert sorted(p.name for p in (tmp_path / "adapters" / name).iterdir()) == [
            "step-000001",
            "step-000002",
        ]
    assert PASS1 not in trainer.callback_metrics and "time/bench_eval_s" in trainer.callback_metrics

    out = io.StringIO()
    Console(file=out, width=160).print(bench.summary_table())
    header = next(line for line in out.getvalue().splitlines() if "benchmark" in line)
    assert A in header and B in header and "4 problems" in out.getvalue()
    after = bench.histories[B][-1][1].scores["tiny_heldout"]
    assert f"→ {100 * after.pass_at_1:.1f} ± {100 * after.stderr:.1f}" in out.getvalue()


def test_a_solo_run_keeps_its_tags_folders_and_state(tmp_path: Path) -> None:
    m = GRPOModule(model=TINY, lora=LoRASettings(r=4, alpha=8, dropout=0.0))
    m.configure_model()
    m.connect_rollouts(EngineRollouts("hf", SamplingConfig(), 4, VLLMConfig()))
    trainer = SimpleNamespace(
        global_step=1,
        is_global_zero=True,
        logger=None,
        callback_metrics={"train/reward": torch.tensor(0.5)},
        strategy=SimpleNamespace(barrier=lambda: None),
    )
    bench = BenchmarkEval(["tiny_heldout"], limit=2, k=1, sampling=SamplingConfig(max_new_tokens=16, seed=0))
    results = bench.run(trainer, m)  # type: ignore[arg-type]
    assert (
        list(results) == ["default"] and bench.history == [(1, results["default"])] and not bench.shared_steps
    )
    assert PASS1 in trainer.callback_metrics and not any(
        k.endswith("/default") for k in trainer.callback_metrics
    )
    ckpt = AdapterCheckpoint(dirpath=str(tmp_path), monitor=PASS1)
    ckpt.save(trainer, m)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]
    assert (tmp_path / "step-000001" / "adapter_model.safetensors").is_file()
    meta = json.loads((tmp_path / "step-000001" / "lightning_tina.json").read_text())
    assert "adapter" not in meta and meta["metrics"]["train/reward"] == 0.5
    assert ckpt.state_dict() == {
        "saved": [(1, pytest.approx(results["default"].scores["tiny_heldout"].pass_at_1))],
        "saved_by_adapter": {},
    }
