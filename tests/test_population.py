"""Population runs: settings, one base with several adapters, one rollout call, independent per-adapter updates."""

from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_tina.datamodule import ReasoningDataModule
from lightning_tina.grpo import GRPOSettings
from lightning_tina.module import GRPOModule
from lightning_tina.optim import OptimSettings
from lightning_tina.policy import LoRASettings
from lightning_tina.population import (
    AdapterSettings,
    activate,
    adapter_runs,
    comparison_layout,
    resolve_population,
)
from lightning_tina.rewards import RewardSpec, register_reward
from lightning_tina.rollout.base import SamplingConfig
from lightning_tina.rollout.batch import make_rollouts
from lightning_tina.rollout.hf import HFEngine
from lightning_tina.rollout.source import ReplayRollouts
from lightning_tina.tiny.task import heldout_rows
from lightning_tina.types import PromptBatch

TINY = str(Path(__file__).resolve().parents[1] / "data" / "tiny")
G = 4


@register_reward("test_population_bonus")
def _bonus(completions: list[str], bonus: list[float] | None = None, **_) -> list[float | None]:
    """The completion's length plus the row's `bonus` column: a test changes one adapter's rewards through it."""
    extra = bonus if bonus is not None else [0.0] * len(completions)
    return [len(c) / 100 + float(b or 0.0) for c, b in zip(completions, extra, strict=True)]


def _module(population: list[AdapterSettings] | None, dropout: float = 0.0, **grpo) -> GRPOModule:
    m = GRPOModule(
        model=TINY,
        lora=LoRASettings(r=4, alpha=8, dropout=dropout),
        grpo=GRPOSettings(num_generations=G, batch_size=8, micro_batch_size=3, **grpo),
        optim=OptimSettings(lr=1e-2, warmup_ratio=0.0),
        rewards=[RewardSpec("accuracy"), RewardSpec("test_population_bonus")],
        population=population,
    )
    m.configure_model()
    return m


def _trainer(steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=list(callbacks),
    )


def _datamodule() -> ReasoningDataModule:
    return ReasoningDataModule(tokenizer=TINY, prompts_per_step=2, val_source=None)


def _lora_weights(m: GRPOModule, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s weights under names without the adapter (comparable across runs and names)."""
    marker = f".{name}."
    return {
        k.replace(marker, "."): p.detach().clone()
        for k, p in m.policy.named_parameters()
        if "lora_" in k and marker in k
    }


# ---- settings --------------------------------------------------------------------------------------------------------


def test_members_override_the_shared_sections_and_keep_the_rest():
    lora, optim = LoRASettings(r=16, alpha=32, dropout=0.0), OptimSettings(lr=2e-3, warmup_ratio=0.05)
    members = resolve_population(
        [
            AdapterSettings("small", lora={"r": 4, "alpha": 8}),
            AdapterSettings("fast", optim={"lr": 4e-3}, seed=3),
        ],
        lora,
        optim,
    )
    assert [m.name for m in members] == ["small", "fast"]
    assert (members[0].lora.r, members[0].lora.alpha, members[0].lora.dropout) == (4, 8, 0.0)
    assert members[0].optim == optim
    assert members[1].lora == lora and members[1].optim.lr == 4e-3 and members[1].optim.warmup_ratio == 0.05
    assert members[1].seed == 3 and members[1].metric("train/reward") == "train/reward/fast"
    solo = resolve_population(None, lora, optim)
    assert len(solo) == 1 and solo[0].metric("train/reward") == "train/reward"


@pytest.mark.parametrize(
    "population, match",
    [
        ([], "model.population is empty"),
        ([AdapterSettings("x"), AdapterSettings("x")], r"unique, \['x'\] repeat"),
        (
            [AdapterSettings("x", lora={"rank": 8})],
            r"model.population\[x\].lora: unknown or shared keys \['rank'\]",
        ),
        ([AdapterSettings("x", lora={"enabled": False})], r"unknown or shared keys \['enabled'\]"),
        ([AdapterSettings("x", optim={"lr": -1.0})], r"model.population\[x\].optim: .*lr"),
        ([AdapterSettings("x", lora={"r": 0})], r"model.population\[x\].lora: .*r"),
    ],
)
def test_bad_population_settings_name_the_member_and_key(population, match):
    with pytest.raises(ValueError, match=match):
        resolve_population(population, LoRASettings(), OptimSettings())


def test_bad_adapter_names_and_unsupported_combinations_are_refused():
    with pytest.raises(ValueError, match="adapter name 'lr.1'"):
        AdapterSettings("lr.1")
    with pytest.raises(ValueError, match="model.lora.enabled: true"):
        resolve_population([AdapterSettings("x")], LoRASettings(enabled=False), OptimSettings())
    with pytest.raises(ValueError, match="model.grpo.dynamic_sampling"):
        GRPOModule(
            model=TINY,
            grpo=GRPOSettings(num_generations=G, batch_size=8, dynamic_sampling=True),
            population=[AdapterSettings("x"), AdapterSettings("y")],
        )


def test_adapter_runs_and_the_comparison_layout():
    assert adapter_runs(["a", "a", "b", "c", "c"]) == [("a", 0, 2), ("b", 2, 3), ("c", 3, 5)]
    charts = comparison_layout()["population"]
    assert charts["train/reward"][1] == [r"^train/reward/[^/]+$"]


# ---- one base, several adapters ----------------------------------------------------------------------------------


def test_every_adapter_is_trainable_with_its_own_rank_and_optimizer():
    m = _module(
        [AdapterSettings("x", lora={"r": 2}), AdapterSettings("y", lora={"r": 8}, optim={"lr": 1e-3})]
    )
    assert m.adapter_names == ("x", "y") and m.engine_spec().lora_rank == 8
    assert m.engine_spec().adapters == ("x", "y")
    shapes = {n: tuple(p.shape) for n, p in m.policy.named_parameters() if "lora_A" in n and "q_proj" in n}
    assert {s[0] for n, s in shapes.items() if ".x." in n} == {2} and {
        s[0] for n, s in shapes.items() if ".y." in n
    } == {8}
    assert all(p.requires_grad for n, p in m.policy.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in m.policy.named_parameters() if "lora_" not in n)
    configured = m.configure_optimizers()
    assert len(configured) == 2
    lrs = [c["optimizer"].param_groups[0]["lr"] for c in configured]
    assert lrs == [1e-2, 1e-3]
    owned = [{id(p) for g in c["optimizer"].param_groups for p in g["params"]} for c in configured]
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == {
        id(p) for n, p in m.policy.named_parameters() if "lora_" in n
    }
    activate(
        m.policy, "y"
    )  # switching keeps the other adapter trainable (PEFT's set_adapter would freeze it)
    assert all(p.requires_grad for n, p in m.policy.named_parameters() if "lora_" in n)


def test_seeded_members_initialize_from_their_seed_alone():
    torch.manual_seed(0)
    one = _module([AdapterSettings("x", seed=7), AdapterSettings("y")])
    torch.manual_seed(1)
    two = _module([AdapterSettings("w"), AdapterSettings("x", seed=7)])
    wa, wb = _lora_weights(one, "x"), _lora_weights(two, "x")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _random_b(m: GRPOModule, seed: int) -> None:
    """Non-zero lora_B weights (a fresh adapter is the base model exactly)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.policy.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_a_mixed_adapter_generate_equals_each_adapter_alone():
    m = _module(
        [
            AdapterSettings("x", lora={"r": 2}),
            AdapterSettings("y", lora={"r": 8, "target_modules": ["q_proj", "up_proj"]}),
        ]
    )
    _random_b(m, 0)
    rows = heldout_rows(3)
    dm = ReasoningDataModule(tokenizer=TINY)
    dm.setup("fit")
    ids = [dm.render(r["problem"]) for r in rows]
    engine = HFEngine(m.policy, m.tokenizer)
    # top_k 1: sampling that always takes the most likely token, so that n > 1 (the rows generate expands) works
    greedy = SamplingConfig(max_new_tokens=16, temperature=1.0, top_k=1)
    mixed = engine.generate(ids + ids, 2, greedy, adapters=["x"] * 3 + ["y"] * 3)
    alone = [engine.generate(ids, 2, greedy, adapters=[name] * 3) for name in ("x", "y")]
    assert [g.token_ids for g in mixed] == [g.token_ids for g in alone[0] + alone[1]]
    assert [g.token_ids for g in alone[0]] != [g.token_ids for g in alone[1]]  # the adapters do differ
    activate(m.policy, "y")
    direct = engine.generate(ids, 2, greedy)  # PEFT's own path with y active
    assert [g.token_ids for g in direct] == [g.token_ids for g in alone[1]]
    with pytest.raises(ValueError, match=r"adapters \['z'\] are not in the policy"):
        engine.generate(ids, 1, greedy, adapters=["z"] * 3)


# ---- training ------------------------------------------------------------------------------------------------------


class _Recorder(L.Callback):
    def __init__(self, keys: list[str]) -> None:
        self.keys, self.seen = keys, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append([float(trainer.callback_metrics[k]) for k in self.keys])


def _fit_hf(m: GRPOModule, steps: int, keys: list[str]) -> list[list[float]]:
    from lightning_tina.callbacks import RolloutCallback

    rec = _Recorder(keys)
    rollout = RolloutCallback(engine="hf", num_generations=G, sampling=SamplingConfig(max_new_tokens=24))
    _trainer(steps, [rollout, rec]).fit(m, datamodule=_datamodule())
    return rec.seen


def test_a_population_of_one_is_the_solo_run_bit_for_bit():
    """Same seed: the same rollouts, losses and adapter, through the real engine (sampling included)."""
    stats = ["train/loss", "train/kl", "train/reward", "train/grad_norm"]
    L.seed_everything(0)
    solo = _module(None, dropout=0.1)
    solo_stats = _fit_hf(solo, 3, stats)
    L.seed_everything(0)
    pop = _module([AdapterSettings("only")], dropout=0.1)
    pop_stats = _fit_hf(pop, 3, [f"{k}/only" for k in stats])
    assert solo_stats == pop_stats and len(solo_stats) == 3
    ws, wp = _lora_weights(solo, "default"), _lora_weights(pop, "only")
    assert ws.keys() == wp.keys() and all(torch.equal(ws[k], wp[k]) for k in ws)


def test_one_rollout_call_serves_every_adapter(monkeypatch):
    calls: list[list[str] | None] = []
    generate = HFEngine.generate

    def spy(self, prompt_ids, n, sampling, adapters=None):
        calls.append(None if adapters is None else list(adapters))
        return generate(self, prompt_ids, n, sampling, adapters)

    monkeypatch.setattr(HFEngine, "generate", spy)
    m = _module([AdapterSettings("x"), AdapterSettings("y", optim={"lr": 1e-3}), AdapterSettings("z")])
    seen = _fit_hf(m, 2, ["train/reward/x", "train/reward/y", "train/reward/z"])
    assert calls == [["x"] * 2 + ["y"] * 2 + ["z"] * 2] * 2 and len(seen) == 2
    assert m.policy_version == 6  # one optimizer step per adapter per training step
    # the reference passes (adapters disabled) left every adapter trainable, so a checkpoint keeps them all
    assert m.grpo.beta > 0 and all(p.requires_grad for n, p in m.policy.named_parameters() if "lora_" in n)
    checkpoint = {"state_dict": {k: v for k, v in m.state_dict().items()}}
    m.on_save_checkpoint(checkpoint)
    assert {k.split("lora_")[1].split(".")[1] for k in checkpoint["state_dict"]} == {"x", "y", "z"}


def _population_rollouts(m: GRPOModule, k: int) -> tuple[PromptBatch, object]:
    """k adapters' rollouts of one step (adapter-major), sampled from the base (every fresh adapter equals it)."""
    rows = heldout_rows(2)
    dm = ReasoningDataModule(tokenizer=TINY)
    dm.setup("fit")
    ids = [dm.render(r["problem"]) for r in rows]
    batch = PromptBatch(prompt_ids=ids * k, rows=[dict(r) for r in rows * k])
    torch.manual_seed(0)
    gens = HFEngine(m.policy, m.tokenizer).generate(ids * k, G, SamplingConfig(max_new_tokens=24))
    return batch, make_rollouts(batch, gens, G, m.tokenizer)


def _one_step(rollouts, bonus_rows: range | None = None) -> GRPOModule:
    """One training step of a three-adapter population on fixed rollouts; `bonus_rows` get a reward bonus."""
    torch.manual_seed(0)
    m = _module(
        [
            AdapterSettings("x", lora={"r": 2}),
            AdapterSettings("y", lora={"r": 4}),
            AdapterSettings("z", lora={"r": 8}),
        ],
        beta=0.04,
    )
    rows = [dict(r) for r in rollouts.rows]
    for i in bonus_rows or ():
        rows[i]["bonus"] = float(i % 3)  # varies within groups: new advantages for those rows
    m.connect_rollouts(ReplayRollouts([rollouts._replace(rows=rows)], group_size=G, max_new_tokens=24))
    _trainer(1).fit(m, datamodule=_datamodule())
    return m


def test_an_adapters_update_does_not_depend_on_the_other_adapters_rewards():
    torch.manual_seed(0)
    base = _module([AdapterSettings("x"), AdapterSettings("y"), AdapterSettings("z")])
    _, rollouts = _population_rollouts(base, 3)
    n = 2 * G
    plain = _one_step(rollouts)
    changed = _one_step(rollouts, bonus_rows=range(n, 2 * n))  # adapter y's rows only
    for name in ("x", "z"):
        wa, wb = _lora_weights(plain, name), _lora_weights(changed, name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    wa, wb = _lora_weights(plain, "y"), _lora_weights(changed, "y")
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    fresh = _lora_weights(base, "x")
    assert any(not torch.equal(fresh[k], _lora_weights(plain, "x")[k]) for k in fresh)  # x did train


def test_twin_adapters_on_the_same_rows_train_exactly_as_one():
    """Two members with the same settings and seed, given the same completions, stay bit-identical to each other and
    to a population of one over several steps: no cross-talk between adapters in the passes, the optimizers, the
    schedules or the checkpointable state."""
    torch.manual_seed(0)
    probe = _module([AdapterSettings("x", seed=5)])
    _, one = _population_rollouts(probe, 1)
    one = one._replace(rows=[{**r, "bonus": float(i % 3)} for i, r in enumerate(one.rows)])  # varied rewards
    twice = one._replace(
        **{k: torch.cat([v, v]) for k, v in one._asdict().items() if isinstance(v, torch.Tensor)},
        completions=one.completions * 2,
        rows=one.rows * 2,
    )

    def fit(population, rollouts) -> GRPOModule:
        torch.manual_seed(0)
        m = _module(population, beta=0.04)
        m.connect_rollouts(ReplayRollouts([rollouts], group_size=G, max_new_tokens=24))
        _trainer(3).fit(m, datamodule=_datamodule())
        return m

    solo = fit([AdapterSettings("x", seed=5)], one)
    twins = fit([AdapterSettings("x", seed=5), AdapterSettings("y", seed=5, optim={"lr": 1e-2})], twice)
    ref = _lora_weights(solo, "x")
    for name in ("x", "y"):
        got = _lora_weights(twins, name)
        assert all(torch.equal(ref[k], got[k]) for k in ref), name
    assert any(not torch.equal(ref[k], _lora_weights(probe, "x")[k]) for k in ref)  # they did train


def test_a_checkpoint_of_other_adapters_is_refused():
    m = _module([AdapterSettings("x"), AdapterSettings("y")])
    checkpoint = {"hyper_parameters": dict(m.hparams), "state_dict": {}}
    other = _module([AdapterSettings("x"), AdapterSettings("z")])
    with pytest.raises(
        ValueError, match=r"model.population=\['x', 'y'\] but this run has model.population=\['x', 'z'\]"
    ):
        other.on_load_checkpoint(checkpoint)
    solo = _module(None)
    with pytest.raises(ValueError, match=r"model.population='null \(a solo run\)'"):
        solo.on_load_checkpoint(checkpoint)
    ranks = _module([AdapterSettings("x"), AdapterSettings("y", lora={"r": 8})])
    with pytest.raises(ValueError, match=r"model.population\[y\].lora.r=4 but this run has .*=8"):
        ranks.on_load_checkpoint(checkpoint)
