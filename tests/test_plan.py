"""The memory planner (lightning_tina/plan.py): every Tina recipe parses, prints and fits a 48 GB L40S; one case is
checked against a hand computation; `fit`'s refusal on CUDA names the setting to change (issue 17)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from lightning_tina import plan as planner

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(
    p
    for p in (ROOT / "configs" / "tina").glob("*.yaml")
    if p.name != "base.yaml" and not p.stem.endswith("_population")
)
POPULATIONS = sorted((ROOT / "configs" / "tina").glob("*_population.yaml"))


@pytest.fixture(scope="module")
def parsed() -> dict[str, dict]:
    return {p.stem: planner.parse_recipe(str(p)) for p in RECIPES}


def test_every_recipe_prints_a_plan_that_fits_an_l40s(
    parsed: dict[str, dict], capsys: pytest.CaptureFixture[str]
) -> None:
    assert len(parsed) == 21
    for name, cfg in parsed.items():
        plan = planner.plan_for(cfg, 48.0, name)
        assert plan.fits, "\n".join(plan.lines())
        assert 10 < plan.generation_gb < 48 and 10 < plan.training_gb < 48, name
    assert planner.main(["--config", str(RECIPES[0]), "--config", str(RECIPES[-1])]) == 0
    out = capsys.readouterr().out
    for key in ("base weights", "adapter + grads + AdamW", "activations, checkpointing on", "log-prob chunk"):
        assert out.count(key) == 2
    assert "of which KV cache" in out and "=> FITS" in out


def test_open_rs3_against_a_hand_computation(parsed: dict[str, dict]) -> None:
    """DeepSeek-R1-Distill-Qwen-1.5B: embedding and untied head 151936 x 1536 each; per layer q and o 1536 x 1536,
    k and v 1536 x 256 (2 KV heads of 128), q/k/v biases, gate/up/down 3 x 1536 x 8960, two norms."""
    plan = planner.plan_for(parsed["open_rs3"], 48.0, "open_rs3")
    per_layer = 2 * 1536 * 1536 + 2 * 1536 * 256 + (1536 + 2 * 256) + 3 * 1536 * 8960 + 2 * 1536
    params = 2 * 151936 * 1536 + 28 * per_layer + 1536
    assert params == 1_777_088_000  # "1.78B"
    assert plan.parts["base weights"] == pytest.approx(params * 2 / 1e9)  # bfloat16
    lora = (
        28 * 32 * ((1536 + 1536) * 2 + (1536 + 256) * 2 + 3 * (1536 + 8960))
    )  # r=32 on all seven projections
    assert plan.parts["adapter + grads + AdamW"] == pytest.approx(
        lora * 20 / 1e9
    )  # fp32 w, g, m, v + DDP bucket
    tokens = 6 * (512 + 3584)  # micro-batch 6 (one group of G=6) at the longest prompt + completion
    per_token = 28 * 2 * 1536 + (56 * 1536 + 11 * 8960) + 4 * 8960  # layer inputs + one layer + its backward
    assert plan.parts["activations, checkpointing on"] == pytest.approx(tokens * per_token / 1e9)
    assert plan.parts["log-prob chunk"] == pytest.approx(2.5 * 4 * 151936 * 1024 / 1e9)
    assert plan.parts["vLLM share (utilization x card)"] == pytest.approx(0.4 * 48)
    kv = 0.4 * 48 - params * 2 / 1e9 - planner.ENGINE_OVERHEAD_GB
    assert plan.parts["  of which KV cache"] == pytest.approx(kv)
    assert (
        planner.KNOWN_SHAPES["deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"].kv_bytes_per_token()
        == 28 * 2 * 256 * 2
    )
    resident = params * 2 / 1e9 + lora * 20 / 1e9
    assert plan.generation_gb == pytest.approx(resident + planner.RUNTIME_GB + 0.4 * 48)
    training = resident + tokens * per_token / 1e9 + plan.parts["log-prob chunk"] + planner.RUNTIME_GB
    assert plan.training_gb == pytest.approx(training + planner.ASLEEP_ENGINE_GB)
    assert 24 < plan.peak_gb < 25  # 24.5 GB of 48


def test_before_the_fixes_the_long_recipes_did_not_fit(parsed: dict[str, dict]) -> None:
    """Without emptying the trainer's cache before the wake-up, the long-completion ablation cannot fit; with every
    rank's engine on GPU 0 no 2-GPU recipe can."""
    long = parsed["open_rs3_long_completion_ablation"]
    assert not planner.plan_for(long, 48.0, before_fixes=True, engines_on_gpu0=False).fits
    assert planner.plan_for(long, 48.0).fits
    for name, cfg in parsed.items():
        assert not planner.plan_for(cfg, 48.0, name, before_fixes=True).fits, name


def test_a_local_model_folder_is_read_from_its_config(parsed: dict[str, dict]) -> None:
    cfg = dict(parsed["open_rs3"], model=dict(parsed["open_rs3"]["model"], model=str(ROOT / "data" / "tiny")))
    plan = planner.plan_for(cfg, 48.0)
    assert plan.parts["base weights"] < 0.01 and plan.fits
    with pytest.raises(ValueError, match="model.model='no-such/model'"):
        planner.model_shape("no-such/model")


def test_fit_refuses_a_plan_that_cannot_fit_and_names_the_setting(
    parsed: dict[str, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = parsed["open_rs3"]
    greedy = dict(
        cfg, rollout=dict(cfg["rollout"], vllm=dict(cfg["rollout"]["vllm"], gpu_memory_utilization=0.95))
    )
    with pytest.raises(
        ValueError, match=r"lower rollout.vllm.gpu_memory_utilization \(now 0.95; at most 0.8"
    ):
        planner.check_plan(greedy, 48.0)
    grpo = dict(cfg["model"]["grpo"], gradient_checkpointing=False)
    no_gc = dict(cfg, model=dict(cfg["model"], grpo=grpo))
    with pytest.raises(ValueError, match="set model.grpo.gradient_checkpointing: true"):
        planner.check_plan(no_gc, 48.0)
    grpo = dict(cfg["model"]["grpo"], micro_batch_size=48, batch_size=48)
    big = dict(cfg, model=dict(cfg["model"], grpo=grpo))
    with pytest.raises(ValueError, match=r"lower model.grpo.micro_batch_size \(now 48; at most \d+ fits\)"):
        planner.check_plan(big, 48.0)
    assert planner.check_plan(cfg, 48.0).fits

    # what fit runs first (TinaCLI.before_fit): only on a CUDA device, against that card
    gpu = types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=torch.device("cuda", 1)))
    props = types.SimpleNamespace(total_memory=46068 * 2**20)  # an L40S
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert planner.check_plan_on_device({"fit": cfg}, gpu).fits
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        planner.check_plan_on_device({"fit": greedy}, gpu)
    monkeypatch.setenv("TINA_SKIP_MEMORY_PLAN", "1")
    assert planner.check_plan_on_device({"fit": greedy}, gpu) is None
    cpu = types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=torch.device("cpu")))
    monkeypatch.delenv("TINA_SKIP_MEMORY_PLAN")
    assert planner.check_plan_on_device({"fit": greedy}, cpu) is None


def test_the_cli_runs_the_check_before_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_tina.__main__ import TinaCLI

    seen = []
    monkeypatch.setattr(
        planner, "check_plan_on_device", lambda config, trainer: seen.append((config, trainer))
    )
    fake = types.SimpleNamespace(config={"fit": {}}, trainer="trainer")
    TinaCLI.before_fit(fake)  # type: ignore[arg-type]
    assert seen == [({"fit": {}}, "trainer")]


@pytest.fixture(scope="module")
def populations() -> dict[str, dict]:
    return {p.stem: planner.parse_recipe(str(p)) for p in POPULATIONS}


def test_population_recipes_plan_k_adapters_and_k_times_the_generation(
    parsed: dict[str, dict], populations: dict[str, dict], capsys: pytest.CaptureFixture[str]
) -> None:
    """A population holds K adapters with their optimizer states (each sized by its own rank) and K LoRA slots in
    the engine, samples K x the completions in one call, and trains one adapter's rows at a time."""
    assert set(populations) == {"limr_rank_population", "limr_lr_population"}
    solo = planner.plan_for(parsed["limr"], 48.0, "limr")
    rank = planner.plan_for(populations["limr_rank_population"], 48.0, "limr_rank_population")
    assert rank.fits and planner.plan_for(populations["limr_lr_population"], 48.0).fits
    assert rank.generation_gb > solo.generation_gb
    # per adapter: weights, gradients, AdamW (and the DDP bucket) grow in proportion to the rank
    ranks = {4: "rank_4", 8: "rank_8", 16: "rank_16", 32: "rank_32", 128: "rank_128"}
    terms = {r: rank.parts[f"  adapter {name} (r={r})"] for r, name in ranks.items()}
    assert list(terms.values()) == sorted(terms.values())
    for r, term in terms.items():
        assert term == pytest.approx(solo.parts["adapter + grads + AdamW"] * r / 32)
    assert rank.parts["adapters + grads + AdamW (5 adapters)"] == pytest.approx(sum(terms.values()))
    # the engine: five LoRA slots of the largest rank (bf16), taken from the KV cache of the same share
    per_rank_unit = 28 * ((1536 + 1536) * 2 + (1536 + 256) * 2 + 3 * (1536 + 8960))
    slots = rank.parts["  of which LoRA slots (5 x r=128)"]
    assert slots == pytest.approx(5 * 128 * per_rank_unit * 2 / 1e9)
    assert rank.parts["  of which KV cache"] == pytest.approx(solo.parts["  of which KV cache"] - slots)
    assert rank.parts["vLLM share (utilization x card)"] == solo.parts["vLLM share (utilization x card)"]
    resident = rank.parts["base weights"] + sum(terms.values())
    assert rank.generation_gb == pytest.approx(resident + planner.RUNTIME_GB + 0.4 * 48)
    # training: one adapter's micro-batch at a time, as the solo run
    for key in ("activations, checkpointing on", "log-prob chunk"):
        assert rank.parts[key] == solo.parts[key]
    assert rank.training_gb - solo.training_gb == pytest.approx(
        sum(terms.values()) - solo.parts["adapter + grads + AdamW"]
    )
    text = "\n".join(rank.lines())
    assert "5 adapters x 16 = 80 completions per rank" in text and "max_num_seqs 80" in text
    assert "297k KV-cache tokens at full length (5 x a solo step's)" in text
    assert planner.main(["--config", str(POPULATIONS[0])]) == 0
    assert "population of" in capsys.readouterr().out


def test_population_with_hf_generate_holds_k_times_the_kv_cache() -> None:
    tiny = planner.parse_recipe(str(ROOT / "configs" / "tiny.yaml"))
    population = planner.parse_recipe(str(ROOT / "configs" / "population" / "tiny_lr.yaml"))
    solo_plan, plan = planner.plan_for(tiny, 48.0), planner.plan_for(population, 48.0)
    assert plan.parts["HF generate KV cache (4 adapters)"] == pytest.approx(
        4 * solo_plan.parts["HF generate KV cache"]
    )
    assert plan.generation_gb > solo_plan.generation_gb
    assert plan.parts["activations, checkpointing off"] == solo_plan.parts["activations, checkpointing off"]


def test_population_with_merged_weight_sync_is_refused(populations: dict[str, dict]) -> None:
    cfg = populations["limr_lr_population"]
    merged = dict(cfg, rollout=dict(cfg["rollout"], vllm=dict(cfg["rollout"]["vllm"], weight_sync="merged")))
    with pytest.raises(ValueError, match="set rollout.vllm.weight_sync: lora"):
        planner.check_plan(merged, 48.0)
