"""Issue 18's RL options against hand-computed values: soft overlong punishment, GSPO, CISPO, truncation mask."""

import math
from pathlib import Path

import pytest
import torch

from lightning_tina import grpo
from lightning_tina.datamodule import ReasoningDataModule
from lightning_tina.grpo import GRPOSettings, cispo_surrogate, loss_mask, sequence_clipped_surrogate
from lightning_tina.length_rewards import soft_overlong_reward
from lightning_tina.module import GRPOModule
from lightning_tina.optim import OptimSettings
from lightning_tina.policy import LoRASettings
from lightning_tina.rewards import RewardSet, RewardSpec, register_reward
from lightning_tina.rollout.batch import make_rollouts
from lightning_tina.types import Generation, PromptBatch, Rollouts

# ---- soft overlong punishment (DAPO) ------------------------------------------------------------------------------


def _ids(*lengths: int) -> list[list[int]]:
    return [[7] * n for n in lengths]


def test_soft_overlong_is_zero_then_linear_over_the_buffer():
    # L_max = 100, L_buf = 20: 0 up to 80 tokens, then -(L - 80) / 20, -1 at 100 and beyond
    got = soft_overlong_reward(
        ["x"] * 5, max_completion_length=100, buffer_length=20, completion_ids=_ids(10, 80, 90, 100, 130)
    )
    assert got == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])


def test_soft_overlong_default_buffer_and_penalty():
    # buffer_length defaults to L_max // 5 = 10, so the penalty starts at 40 tokens; at 45: -2 * (45 - 40) / 10
    got = soft_overlong_reward(["x"] * 2, max_completion_length=50, penalty=2.0, completion_ids=_ids(40, 45))
    assert got == pytest.approx([0.0, -1.0])


def test_soft_overlong_errors_name_the_setting():
    with pytest.raises(ValueError, match="max_completion_length: set it to rollout.sampling.max_new_tokens"):
        soft_overlong_reward(["x"], completion_ids=_ids(3))
    with pytest.raises(ValueError, match="buffer_length=200"):
        soft_overlong_reward([], max_completion_length=100, buffer_length=200)
    with pytest.raises(KeyError, match="completion_ids"):
        soft_overlong_reward(["x"], max_completion_length=100)
    with pytest.raises(ValueError, match=r"model.rewards\[0\].kwargs: .*max_completion_length"):
        RewardSet([RewardSpec(name="soft_overlong")])  # checked when the config is read


def test_soft_overlong_through_the_reward_set_with_token_ids():
    rewards = RewardSet(
        [RewardSpec(name="soft_overlong", kwargs={"max_completion_length": 8, "buffer_length": 4})]
    )
    rows = [{"problem": "p", "solution": "1"}] * 4
    out = rewards(
        ["a", "b", "c", "d"], rows, group_size=2, extra_columns={"completion_ids": _ids(2, 5, 6, 8)}
    )
    assert out.total.tolist() == pytest.approx([0.0, -0.25, -0.5, -1.0])
    assert rewards.metrics(out)["rewards/soft_overlong/mean"] == pytest.approx(-0.4375)
    with pytest.raises(ValueError, match="completion_ids"):
        rewards(["a"], [{"completion_ids": 1}], extra_columns={"completion_ids": _ids(1)})


# ---- GSPO: sequence-level importance ratio -------------------------------------------------------------------------


def test_sequence_ratio_is_the_geometric_mean_clipped_per_sequence():
    old = torch.zeros(2, 3)
    # seq 0: tokens 2 and 1 (third is padding, ignored): s = sqrt(2) = 1.414 > 1.2, A = 1 -> loss -1.2, clipped high
    # seq 1: tokens 0.5, 0.5, 2: s = 0.5 ** (1/3) = 0.794 < 0.8, A = -2 -> loss -min(-1.587, -1.6) = 1.6, clipped low
    logp = torch.log(torch.tensor([[2.0, 1.0, 5.0], [0.5, 0.5, 2.0]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, low, high = sequence_clipped_surrogate(
        logp, old, torch.tensor([1.0, -2.0]), mask=mask, epsilon_low=0.2, epsilon_high=0.2
    )
    assert torch.allclose(loss, torch.tensor([[-1.2] * 3, [1.6] * 3]))
    assert high[0].all() and not high[1].any() and low[1].all() and not low[0].any()
    # inside the clip range the loss is -s * A
    loss, low, high = sequence_clipped_surrogate(
        logp, old, torch.tensor([1.0, -2.0]), mask=mask, epsilon_low=0.5, epsilon_high=0.5
    )
    assert torch.allclose(loss[:, 0], torch.tensor([-math.sqrt(2), 2 * 0.5 ** (1 / 3)]))
    assert not (low.any() or high.any())


def test_sequence_ratio_gradient_is_the_sequence_mean_of_token_gradients():
    # on-policy (old = logp): s_i = 1, d L / d logp_it = -A_i / (N |o_i|) under the per-sequence mean ("grpo")
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([2.0, -1.0])
    per_token, _, _ = sequence_clipped_surrogate(
        logp, logp.detach(), adv, mask=mask, epsilon_low=0.2, epsilon_high=0.2
    )
    grpo.aggregate_loss(per_token, mask, "grpo").backward()
    want = torch.tensor([[-2.0 / 4, -2.0 / 4, 0.0], [1.0 / 6, 1.0 / 6, 1.0 / 6]])
    assert torch.allclose(logp.grad, want)


def test_sequence_ratio_needs_one_advantage_per_sequence():
    with pytest.raises(ValueError, match="one advantage per completion"):
        sequence_clipped_surrogate(
            torch.zeros(1, 2),
            torch.zeros(1, 2),
            torch.zeros(1, 2),
            mask=torch.ones(1, 2),
            epsilon_low=0.2,
            epsilon_high=0.2,
        )


# ---- CISPO: clipped, detached importance weight times the log-prob -------------------------------------------------


def test_cispo_caps_the_weight_and_keeps_every_gradient():
    # r = 1, 2, 0.5 with eps_high 0.5: w = 1, 1.5 (capped), 0.5 (no lower bound); loss = -w * A * logp
    logp = torch.log(torch.tensor([[1.0, 2.0, 0.5]])).requires_grad_()
    loss, low, high = cispo_surrogate(logp, torch.zeros(1, 3), torch.tensor([1.0]), epsilon_high=0.5)
    assert torch.allclose(loss, torch.tensor([[0.0, -1.5 * math.log(2), -0.5 * math.log(0.5)]]))
    assert high.tolist() == [[False, True, False]] and not low.any()
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, -1.5, -0.5]]))  # the capped token still learns
    # PPO's clip removes that token's gradient instead
    logp.grad = None
    grpo.clipped_surrogate(logp, torch.zeros(1, 3), torch.tensor([1.0]), 0.5, 0.5)[0].sum().backward()
    assert logp.grad[0, 1] == 0.0


def test_cispo_on_policy_gradient_equals_the_policy_gradient():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    cispo_surrogate(logp, logp.detach(), torch.tensor([[3.0, -1.0]]), 0.2)[0].sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[-3.0, 1.0]]))


# ---- masking truncated completions ---------------------------------------------------------------------------------


def test_loss_mask_removes_truncated_completions_only_when_asked():
    m = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    cut = torch.tensor([False, True, False])
    assert torch.equal(loss_mask(m, cut, False), m)
    assert loss_mask(m, cut, True).tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]


# ---- dynamic sampling ----------------------------------------------------------------------------------------------

TINY = str(Path(__file__).resolve().parents[1] / "data" / "tiny")
_SCRIPT: list[bool] = []  # per group, in call order: True = informative (rewards differ), False = all equal


@register_reward("test_scripted_groups", per_completion=True)
def _scripted_groups(completions: list[str], **_) -> list[float | None]:
    """Each group of 4 takes the next entry of _SCRIPT: [0, 1, 0, 1] if True, else [1, 1, 1, 1]."""
    out: list[float | None] = []
    for _ in range(len(completions) // 4):
        out += [0.0, 1.0, 0.0, 1.0] if _SCRIPT.pop(0) else [1.0] * 4
    return out


class _RecordingSource:
    """A RolloutSource of fixed short completions that records the problems of every call."""

    max_new_tokens = 8

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def rollouts(self, batch: PromptBatch, policy) -> Rollouts:
        self.calls.append([row["problem"] for row in batch.rows])
        eos = policy.tokenizer.eos_token_id
        gens = [Generation([5 + i % 3, eos], None, "stop") for i in range(len(batch.prompt_ids) * 4)]
        return make_rollouts(batch, gens, 4, policy.tokenizer)

    def generate(self, prompt_ids, n, sampling, policy):
        raise RuntimeError("not used")


def _dynamic_fit(tmp_path: Path, script: list[bool], max_refill_rounds: int) -> tuple[_RecordingSource, dict]:
    import lightning as L

    _SCRIPT[:] = script
    grpo_settings = GRPOSettings(
        num_generations=4,
        batch_size=8,
        micro_batch_size=4,
        dynamic_sampling=True,
        max_refill_rounds=max_refill_rounds,
    )
    m = GRPOModule(
        model=TINY,
        lora=LoRASettings(r=4, alpha=8, dropout=0.0),
        grpo=grpo_settings,
        optim=OptimSettings(lr=1e-2, warmup_ratio=0.0),
        rewards=[RewardSpec("test_scripted_groups")],
    )
    source = _RecordingSource()
    m.connect_rollouts(source)
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(m, datamodule=ReasoningDataModule(tokenizer=TINY, prompts_per_step=2, val_source=None))
    assert not _SCRIPT, "every scripted group was scored"
    return source, {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_dynamic_sampling_refills_all_equal_groups_with_fresh_prompts(tmp_path):
    # round 0: both groups all-equal; refill of 2 prompts: one informative; refill of 1: informative -> full
    source, logs = _dynamic_fit(tmp_path, [False, False, True, False, True], max_refill_rounds=4)
    assert [len(c) for c in source.calls] == [2, 2, 1]
    problems = [p for call in source.calls for p in call]
    assert len(set(problems)) == 5  # fresh prompts every round, none repeated
    assert logs["dynamic/refill_rounds"] == 2 and logs["dynamic/groups_kept"] == 2
    assert logs["dynamic/groups_dropped"] == 3 and logs["dynamic/groups_padded"] == 0
    assert logs["train/advantage_std"] > 0  # both groups of the step carry a gradient
    assert logs["train/rollout_tokens"] == 5 * 4 * 2  # 5 groups of 4 completions of 2 tokens
    assert logs["dynamic/rollout_tokens_per_kept_group"] == 20


def test_dynamic_sampling_respects_the_cap_and_keeps_the_batch_shape(tmp_path):
    source, logs = _dynamic_fit(tmp_path, [False, False, False, False], max_refill_rounds=1)
    assert [len(c) for c in source.calls] == [2, 2]  # one extra round, then it trains on what there is
    assert logs["dynamic/refill_rounds"] == 1 and logs["dynamic/groups_kept"] == 0
    assert logs["dynamic/groups_padded"] == 2 and logs["dynamic/groups_dropped"] == 4
    assert logs["train/advantage_std"] == 0.0  # padded with zero-advantage groups: the same B x G shape


def _stream_steps(state: dict | None, refills: list[list[int]]) -> tuple[list[list[str]], list[dict]]:
    """Steps as Lightning runs them (the next batch is read before a step), each refilling `refills[k]` prompts:
    the problems each step trained on, and the DataModule's checkpoint state after each step."""
    import copy

    dm = ReasoningDataModule(tokenizer=TINY, prompts_per_step=2, val_source=None)
    dm.setup("fit")
    if state is not None:
        dm.load_state_dict(copy.deepcopy(state))
    it = iter(dm.train_dataloader())
    upcoming = next(it)
    used, states = [], []
    for sizes in refills:
        batch, upcoming = upcoming, next(it)  # Lightning prefetches one batch
        dm.consumed = dict(batch.position)  # what on_before_batch_transfer records
        problems = [row["problem"] for row in batch.rows]
        for n in sizes:
            problems += [row["problem"] for row in dm.refill(n).rows]
        used.append(problems)
        states.append(copy.deepcopy(dm.state_dict()))
    return used, states


def test_refills_resume_exactly_from_every_step():
    refills = [[1], [], [2, 1], [], [], [3], [1], [2]]
    straight, states = _stream_steps(None, refills)
    seen = [p for step in straight for p in step]
    assert len(set(seen)) == len(seen)  # no prompt trained on twice
    # step k's refills follow batch k + 1 (already read), so they lie past the resume point of steps k and k + 1
    assert "skips" in states[0] and "skips" in states[1] and "skips" not in states[4]
    for cut in range(1, len(refills)):
        resumed, _ = _stream_steps(states[cut - 1], refills[cut:])
        assert resumed == straight[cut:], cut


# ---- one config per option ---------------------------------------------------------------------------------------

OPTIONS = {
    "dynamic_sampling": {"dynamic_sampling": True, "max_refill_rounds": 4},
    "gspo": {
        "importance_sampling_level": "sequence", "num_iterations": 2, "epsilon_low": 3e-4, "epsilon_high": 4e-4,
        "beta": 0.0,
    },
    "cispo": {"policy_loss": "cispo", "loss_type": "dapo", "num_iterations": 2, "epsilon_high": 1.0},
    "mask_truncated": {"mask_truncated_completions": True},
    "soft_overlong": {},
}  # fmt: skip


def _resolved(config: Path) -> dict:
    import contextlib
    import io

    import yaml

    from lightning_tina.__main__ import cli_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(config), "--print_config"])
    return yaml.safe_load(out.getvalue())


def test_each_option_config_is_mini_tina_with_its_own_keys_only():
    root = Path(__file__).resolve().parents[1] / "configs"
    assert sorted(p.stem for p in (root / "options").glob("*.yaml")) == sorted(OPTIONS)
    tiny = _resolved(root / "tiny.yaml")
    assert not any(tiny["model"]["grpo"][k] for k in ("dynamic_sampling", "mask_truncated_completions"))
    assert (tiny["model"]["grpo"]["importance_sampling_level"], tiny["model"]["grpo"]["policy_loss"]) == (
        "token",
        "clip",
    )  # off by default: make tiny is Tina's GRPO
    for name, keys in OPTIONS.items():
        cfg = _resolved(root / "options" / f"{name}.yaml")
        changed = {k for k, v in cfg["model"]["grpo"].items() if v != tiny["model"]["grpo"][k]}
        assert changed <= set(keys) and all(cfg["model"]["grpo"][k] == v for k, v in keys.items()), name
        assert cfg["trainer"]["logger"]["init_args"]["name"] == f"tiny_{name}"
        assert cfg["data"] == tiny["data"] and cfg["rollout"] == tiny["rollout"], name
    rewards = _resolved(root / "options" / "soft_overlong.yaml")["model"]["rewards"]
    assert rewards[:2] == tiny["model"]["rewards"] and rewards[2]["name"] == "soft_overlong"
    assert rewards[2]["kwargs"]["max_completion_length"] == tiny["rollout"]["sampling"]["max_new_tokens"]


@pytest.mark.slow
def test_kill_and_resume_with_dynamic_sampling_matches_uninterrupted_run(tmp_path):
    """tests/test_resume.py's check with refills: the prompt stream's refill ranges and the RNG after extra rounds
    are restored, so losses, dynamic-sampling counts and the adapter are bit-identical after a kill at step 3."""
    import yaml
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_resume import _config, _fit

    def config(name: str, kill_at: int | None = None) -> Path:
        path = _config(tmp_path, name, kill_at)
        cfg = yaml.safe_load(path.read_text())
        cfg["model"]["grpo"].update(dynamic_sampling=True, max_refill_rounds=2)
        path.write_text(yaml.safe_dump(cfg))
        return path

    def scalars(name: str) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for events in sorted((tmp_path / "tb" / name).rglob("events.out.tfevents.*")):
            acc = EventAccumulator(str(events))
            acc.Reload()
            for tag in ("train/loss", "dynamic/refill_rounds", "dynamic/groups_kept", "train/rollout_tokens"):
                out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
        return out

    straight = _fit(config("straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _fit(config("resumed", kill_at=3))
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    resumed = _fit(config("resumed"), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b = scalars("straight"), scalars("resumed")
    assert len(a["train/loss"]) == 6 and a == b
    assert sum(a["dynamic/refill_rounds"].values()) > 0  # the run did refill
    wa = load_file(next((tmp_path / "straight/adapters").glob("step-*/adapter_model.safetensors")))
    wb = load_file(next((tmp_path / "resumed/adapters").glob("step-*/adapter_model.safetensors")))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_dynamic_sampling_under_ddp_keeps_ranks_in_step(tmp_path):
    """2 CPU ranks (gloo): every round, every rank draws the neediest rank's number of prompts, so both generate
    the same rounds and train on B x G rows; gradients are averaged, so the adapters stay identical."""
    from test_distributed import PROMPTS_PER_RANK, G, _launch

    ranks = _launch(tmp_path, "ddp", "dynamic")
    calls = [[len(c["prompt_ids"]) for c in r["steps"]] for r in ranks]  # prompts of every generation round
    assert calls[0] == calls[1] and len(calls[0]) > 2, calls  # same rounds on both ranks, and some refills
    trained = [[c for c in r["steps"] if "advantages" in c] for r in ranks]  # one entry per optimizer step
    assert len(trained[0]) == len(trained[1]) > 0
    for a, b in zip(*trained, strict=True):
        assert a["advantages"].shape == b["advantages"].shape == (PROMPTS_PER_RANK * G,)
        for name in a["adapter"]:
            torch.testing.assert_close(a["adapter"][name], b["adapter"][name], rtol=0, atol=0)


def _scored(prompt_len: int, lengths: list[int], rewards: list[float], tag: str):
    """Synthetic Scored rollouts of len(lengths) completions (groups of 2): prompt ids 1, completion ids 2."""
    from lightning_tina.dynamic_sampling import Scored
    from lightning_tina.rewards import RewardOutput

    n, c = len(lengths), max(lengths)
    ids = torch.zeros(n, prompt_len + c, dtype=torch.long)
    attn = torch.zeros_like(ids)
    cmask = torch.zeros(n, c, dtype=torch.long)
    ids[:, :prompt_len], attn[:, :prompt_len] = 1, 1
    for i, k in enumerate(lengths):
        ids[i, prompt_len : prompt_len + k], attn[i, prompt_len : prompt_len + k], cmask[i, :k] = 2, 1, 1
    r = Rollouts(
        ids, attn, cmask, [f"{tag}{i}" for i in range(n)], [{}] * n, torch.zeros(n, dtype=torch.bool), None
    )
    total = torch.tensor(rewards)
    return Scored(r, RewardOutput(total[:, None], total, 0, torch.zeros(1)))


def test_fill_informative_repads_and_discards_the_surplus_that_ddp_draws():
    from lightning_tina.dynamic_sampling import fill_informative

    first = _scored(3, [1, 2, 2, 2], [1.0, 1.0, 0.0, 1.0], "a")  # group a0 all-equal, group a1 informative
    refill = _scored(
        5, [4, 1, 3, 3], [0.0, 1.0, 2.0, 0.0], "b"
    )  # both informative, wider prompt and completion
    # another rank still needs 2 prompts: this rank draws 2 as well, keeps one group and discards the other
    other_rank = iter([2, 0])  # what the other rank still needs before each round
    batch, stats = fill_informative(first, lambda k: refill, 2, 2, 4, 0, lambda x: max(x, next(other_rank)))
    assert stats.groups_kept == 2 and stats.groups_surplus == 1 and stats.refill_rounds == 1
    assert stats.groups_dropped == 1 and stats.groups_padded == 0 and stats.rollout_tokens == 7 + 11
    r = batch.rollouts
    assert r.completions == ["a2", "a3", "b0", "b1"] and batch.scores.total.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert r.input_ids.shape == (4, 5 + 4) and r.completion_mask.sum(-1).tolist() == [2, 2, 4, 1]
    assert r.attention_mask[0].tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0]  # the short prompt is left-padded
    assert r.input_ids[0, 5:].tolist() == [2, 2, 0, 0]  # completions start at the same column


def test_plot_options_reads_pass_at_1_against_training_minutes(tmp_path, monkeypatch):
    """scripts/plot_options.py's table from TensorBoard logs (the figure needs matplotlib, not tested here)."""
    import importlib.util
    import sys

    from torch.utils.tensorboard import SummaryWriter

    spec = importlib.util.spec_from_file_location(
        "plot_options", Path(__file__).parents[1] / "scripts/plot_options.py"
    )
    plot_options = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "plot_options", plot_options)  # its dataclass looks its module up
    spec.loader.exec_module(plot_options)
    for arm, step_s in (("grpo", 30.0), ("dynamic_sampling", 60.0)):
        writer = SummaryWriter(str(tmp_path / arm / "seed1"))
        for step in range(4):  # 4 steps, each step_s seconds (rollout + reward + train), 100 rollout tokens
            for tag, v in (
                ("perf/rollout_s", step_s / 2),
                ("perf/reward_s", 0.0),
                ("perf/train_s", step_s / 2),
            ):
                writer.add_scalar(tag, v, step)
            writer.add_scalar("train/rollout_tokens", 100.0, step)
        for step, score in ((0, 0.25), (2, 0.5), (4, 0.75)):
            writer.add_scalar("bench/tiny_heldout/pass@1", score, step)
        writer.close()
    runs = {r.arm: r for r in plot_options.read_runs(tmp_path, "bench/tiny_heldout/pass@1")}
    assert runs["grpo"].minutes == [0.0, 1.0, 2.0] and runs["dynamic_sampling"].minutes == [0.0, 2.0, 4.0]
    assert runs["grpo"].steps == 4 and runs["grpo"].rollout_tokens == 400
    assert plot_options.score_at(runs["dynamic_sampling"], 3.0) == 0.5  # the last evaluation before 3 minutes
    table = plot_options.table(list(runs.values()), budget=2.0)
    assert "| grpo | 1 | 4 ± 0 | 2.00 ± 0.00 |" in table and "0.750 ± 0.000 | 0.750 ± 0.000 |" in table


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_each_option_config_trains_two_steps(name, tmp_path):
    """configs/options/<name>.yaml end to end on the tiny model (shrunk: 2 steps of 2 prompts, no evaluation)."""
    from lightning_tina.__main__ import cli_main

    root = Path(__file__).resolve().parents[1]
    args = [
        "--trainer.max_steps",
        "2",
        "--trainer.callbacks",
        "[]",
        "--trainer.enable_checkpointing",
        "false",
    ]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path), "--model.grpo.batch_size", "16"]
    args += ["--model.grpo.micro_batch_size", "8", "--trainer.enable_progress_bar", "false"]
    cli = cli_main(["fit", "--config", str(root / "configs" / "options" / f"{name}.yaml"), *args])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2  # optimizer steps (GSPO, CISPO: one rollout batch, two updates)
    assert math.isfinite(float(metrics["train/loss"])) and float(metrics["train/rollout_tokens"]) > 0
    expected = {
        "dynamic_sampling": "dynamic/groups_kept",
        "mask_truncated": "train/truncated_masked",
        "soft_overlong": "rewards/soft_overlong/mean",
    }.get(name, "train/clip_high")
    assert expected in metrics, sorted(metrics)
