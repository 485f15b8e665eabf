"""GRPOModule on the shipped tiny model: LoRA-only updates, reference equality at step 0, clear errors."""

import math
from pathlib import Path

import pytest
import torch

from lightning_tina.datamodule import ReasoningDataModule
from lightning_tina.grpo import GRPOSettings
from lightning_tina.module import GRPOModule
from lightning_tina.optim import OptimSettings
from lightning_tina.policy import LoRASettings
from lightning_tina.rewards import RewardSpec, register_reward
from lightning_tina.rollout.base import SamplingConfig
from lightning_tina.rollout.batch import make_rollouts
from lightning_tina.rollout.hf import HFEngine
from lightning_tina.tiny.task import heldout_rows
from lightning_tina.types import PromptBatch

TINY = str(Path(__file__).resolve().parents[1] / "data" / "tiny")


@register_reward("test_completion_length")
def _completion_length(completions: list[str], **_) -> list[float | None]:
    """Varies within every group, so advantages are never all zero (unlike accuracy on 24 tokens)."""
    return [len(c) / 100 for c in completions]


def _module(**grpo_kwargs) -> GRPOModule:
    grpo = GRPOSettings(num_generations=4, batch_size=8, micro_batch_size=3, **grpo_kwargs)
    m = GRPOModule(
        model=TINY,
        lora=LoRASettings(r=4, alpha=8, dropout=0.0),
        grpo=grpo,
        optim=OptimSettings(lr=1e-2, warmup_ratio=0.0),
        rewards=[RewardSpec("accuracy"), RewardSpec("test_completion_length")],
    )
    m.configure_model()
    return m


def _rollouts(m: GRPOModule, seed: int = 0):
    rows = heldout_rows(2)
    dm = ReasoningDataModule(tokenizer=TINY)
    dm.setup("fit")
    ids = [dm.render(r["problem"]) for r in rows]
    batch = PromptBatch(prompt_ids=ids, rows=rows)
    torch.manual_seed(seed)
    gens = HFEngine(m.policy, m.tokenizer).generate(
        ids, 4, SamplingConfig(max_new_tokens=24, temperature=1.0)
    )
    return make_rollouts(batch, gens, 4, m.tokenizer)


def test_only_lora_parameters_train():
    m = _module()
    trainable = {n for n, p in m.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = m.configure_optimizers()["optimizer"]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in m.policy.parameters() if p.requires_grad}


def test_reference_equals_policy_at_step_zero_and_kl_is_zero():
    m = _module()
    r = _rollouts(m)
    c = r.completion_mask.shape[1]
    pol, _ = m.sequence_logprobs(m.policy, r.input_ids, r.attention_mask, c)
    ref = m._frozen_logprobs(r, reference=True)
    assert torch.equal(pol * r.completion_mask, ref * r.completion_mask)  # LoRA B starts at zero


def test_missing_target_module_is_refused():
    with pytest.raises(ValueError, match=r"model.lora.target_modules.*'not_a_layer'"):
        GRPOModule(model=TINY, lora=LoRASettings(target_modules=["q_proj", "not_a_layer"])).configure_model()


def test_batch_size_must_be_multiple_of_group_size():
    with pytest.raises(
        ValueError, match="model.grpo.batch_size=10 is not a multiple of model.grpo.num_generations=4"
    ):
        GRPOModule(model=TINY, grpo=GRPOSettings(num_generations=4, batch_size=10))


def test_unknown_reward_name_is_refused():
    with pytest.raises(ValueError, match="no_such_reward"):
        GRPOModule(model=TINY, rewards=[RewardSpec("no_such_reward")])


def test_optimizer_step_changes_lora_only(tmp_path):
    m = _module()
    before = {n: p.detach().clone() for n, p in m.policy.named_parameters()}
    trainer = _fit(m, tmp_path, steps=2)
    assert trainer.global_step == 2 and m.policy_version == 2
    changed = {n for n, p in m.policy.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, "no parameter moved"
    assert all("lora_" in n for n in changed), sorted(changed)[:5]
    assert any("lora_B" in n for n in changed)


class _OOMEngine:
    def generate(self, prompt_ids, n, sampling):
        raise torch.OutOfMemoryError("CUDA out of memory")


def test_out_of_memory_in_generation_names_the_settings():
    from lightning_tina.callbacks import RolloutCallback

    cb = RolloutCallback(engine="hf", num_generations=4)
    cb.engine, cb.source.synced_version = _OOMEngine(), 0
    m = _module()
    m.connect_rollouts(cb.source)
    with pytest.raises(
        torch.OutOfMemoryError, match="model.grpo.batch_size.*rollout.sampling.max_new_tokens"
    ):
        m.sampler().generate([[1, 2, 3]], 4, SamplingConfig())


def test_a_replayed_rollout_source_drives_training_and_the_loss_returns_its_stats(tmp_path):
    """The RolloutSource seam: fixed completions, no engine; the micro-batch loss returns (loss, stats)."""
    import lightning as L

    from lightning_tina.rollout.source import ReplayRollouts
    from lightning_tina.types import LossStats

    m = _module()
    r = _rollouts(m)
    source = ReplayRollouts([r], group_size=4, max_new_tokens=24)
    m.connect_rollouts(source)
    adv = torch.linspace(-1, 1, 8)
    loss, stats = m._micro_batch_loss(r, slice(0, 3), adv, None, None, int(r.completion_mask.sum()))
    assert isinstance(stats, LossStats) and stats.loss == pytest.approx(float(loss.detach()))
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(m, datamodule=ReasoningDataModule(tokenizer=TINY, prompts_per_step=2, val_source=None))
    assert source.calls == 2 and m.policy_version == 2
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def _fit(m: GRPOModule, tmp_path, steps: int, prompts: int = 2):
    import lightning as L

    from lightning_tina.callbacks import RolloutCallback

    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[
            RolloutCallback(engine="hf", num_generations=4, sampling=SamplingConfig(max_new_tokens=24))
        ],
        default_root_dir=tmp_path,
    )
    trainer.fit(m, datamodule=ReasoningDataModule(tokenizer=TINY, prompts_per_step=prompts, val_source=None))
    return trainer


def test_nonfinite_updates_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    from lightning_tina import grpo

    aggregate = grpo.aggregate_loss
    monkeypatch.setattr(grpo, "aggregate_loss", lambda *a, **k: aggregate(*a, **k) * float("nan"))
    m = _module(max_nonfinite_updates=1)
    before = {n: p.detach().clone() for n, p in m.policy.named_parameters()}
    with pytest.raises(RuntimeError, match="model.grpo.max_nonfinite_updates=1"):
        _fit(m, tmp_path, steps=5)
    assert m.policy_version == 0 and m.nonfinite_steps == 2  # both NaN updates were skipped, not applied
    assert all(torch.equal(p.detach(), before[n]) for n, p in m.policy.named_parameters())


def test_num_iterations_reuses_a_rollout_for_several_optimizer_steps(tmp_path):
    m = _module(num_iterations=2)
    trainer = _fit(m, tmp_path, steps=2)
    assert m.policy_version == 2 and trainer.global_step == 2  # one rollout batch, two updates
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 1


def test_rewards_are_called_once_per_group(tmp_path):
    """Batch-relative rewards see one group at a time (as in Tina), through RewardSet's group_size."""
    sizes: list[int] = []

    @register_reward("test_records_call_sizes")
    def _record(completions: list[str], **_) -> list[float | None]:
        sizes.append(len(completions))
        return [0.0] * len(completions)

    m = GRPOModule(
        model=TINY,
        lora=LoRASettings(r=4, alpha=8, dropout=0.0),
        grpo=GRPOSettings(num_generations=4, batch_size=8, micro_batch_size=4),
        optim=OptimSettings(lr=1e-2, warmup_ratio=0.0),
        rewards=[RewardSpec("test_records_call_sizes"), RewardSpec("test_completion_length")],
    )
    _fit(m, tmp_path, steps=1)
    assert sizes == [4, 4]  # 2 prompts x G=4 in one step


def test_schedule_steps_sets_the_lr_schedule_apart_from_the_run_length(tmp_path):
    """Tina's recipes schedule the lr over N steps and stop at M < N: the lr after M steps is not the minimum."""
    m = _module()
    m.optim = OptimSettings(lr=1e-2, warmup_ratio=0.0, min_lr_ratio=0.1, schedule_steps=4)
    trainer = _fit(m, tmp_path, steps=2)
    lr = trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0]
    assert lr == pytest.approx(
        1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))
    )  # halfway: 0.55 x lr
    with pytest.raises(ValueError, match="model.optim.schedule_steps=0"):
        OptimSettings(schedule_steps=0)


@pytest.mark.parametrize("trim", [True, False])
def test_reference_and_policy_passes_follow_trim_padding(monkeypatch, trim):
    import lightning_tina.module as module_file

    seen: list[bool] = []
    real = module_file.completion_logprobs
    monkeypatch.setattr(
        module_file, "completion_logprobs", lambda *a, **k: seen.append(k["trim_padding"]) or real(*a, **k)
    )
    m = _module(trim_padding=trim, micro_batch_tokens=None)  # count-based passes (packing: test_packing.py)
    r = _rollouts(m)
    m._frozen_logprobs(r, reference=True)
    m.sequence_logprobs(m.policy, r.input_ids, r.attention_mask, r.completion_mask.shape[1])
    assert seen and set(seen) == {trim}


@pytest.mark.parametrize("micro, ordered", [(8, True), (4, False), (12, False)])
def test_groups_are_ordered_by_length_only_when_a_micro_batch_holds_several(
    tmp_path, monkeypatch, micro, ordered
):
    import lightning_tina.module as module_file

    calls: list[int] = []
    real = module_file.order_groups_by_length
    monkeypatch.setattr(module_file, "order_groups_by_length", lambda r, g: calls.append(g) or real(r, g))
    m = GRPOModule(
        model=TINY,
        lora=LoRASettings(r=4, alpha=8, dropout=0.0),
        grpo=GRPOSettings(num_generations=4, batch_size=12, micro_batch_size=micro),
        optim=OptimSettings(lr=1e-2, warmup_ratio=0.0),
        rewards=[RewardSpec("accuracy"), RewardSpec("test_completion_length")],
    )
    assert _fit(m, tmp_path, steps=1, prompts=3).global_step == 1
    assert calls == ([4] if ordered else [])
