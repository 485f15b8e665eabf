"""DDP on CPU (gloo, 2 processes) against 1 process on the same data: same losses, advantages and adapters.

The 2-process run is launched with torchrun on this file (its `__main__` is the worker); each rank records its
prompts, completions, group advantages, per-step loss, LoRA gradients and LoRA weights. A 1-process run then replays the union of
both ranks' prompts and completions in one batch of twice the size. Because a group's G completions are always
sampled on the rank that owns the prompt (the DataModule yields prompts, the rank samples G per prompt), group
normalization needs no communication and the advantages must be identical; with the per-sequence loss ("grpo") and
equal batches per rank, DDP's gradient average equals the 1-process gradient, so losses and adapters must match.

The same worker runs Lightning's ModelParallelStrategy (FSDP2) with a different data seed per rank, and the launch
scripts are checked (syntax always, scripts/torchrun.sh end to end in the slow suite).

Usage of the worker (what the tests run):  torchrun --nproc_per_node 2 tests/test_distributed.py OUT_DIR [ddp|fsdp]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "data" / "tiny"
G, PROMPTS_PER_RANK, STEPS, MAX_NEW_TOKENS = 4, 2, 2, 64
PACKED_TOKENS = 96  # mode "packed": model.grpo.micro_batch_tokens, small enough to split groups into passes


def _config(
    out: Path,
    world: int,
    prompts_per_step: int,
    strategy: str = "ddp",
    rank: int = 0,
    steps: int = STEPS,
    checkpoints: bool = False,
    engine: str = "hf",
    micro_batch_tokens: int | None = None,
    dynamic: bool = False,
    population: list[dict[str, Any]] | None = None,
) -> Path:
    """The embedded default (configs/tiny.yaml), shrunk: 2 steps, 2 prompts x 4 completions per rank, 64 tokens.

    strategy "fsdp" is Lightning's ModelParallelStrategy (FSDP2) with one data-parallel dimension, and gives each
    rank its own data seed so that unsynchronized gradients would show. `checkpoints` adds AdapterCheckpoint and
    ResumeCheckpoint (every step) under out/adapters and out/ckpt. `engine` "vllm" gives each rank its own
    in-process vLLM engine.
    """
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    if strategy == "fsdp":
        cfg["data"]["seed"] = 100 + rank
        strategy_cfg: Any = {
            "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
            "init_args": {
                "data_parallel_size": world,
                "tensor_parallel_size": 1,
                "save_distributed_checkpoint": False,  # lightning_tina checkpoints hold the adapter only
            },
        }
    else:
        strategy_cfg = "ddp" if world > 1 else "auto"
    cfg["trainer"].update(
        devices=world,
        strategy=strategy_cfg,
        max_steps=steps,
        # no BenchmarkEval (it would evaluate 256 problems before the first step)
        callbacks=[
            {"class_path": f"lightning_tina.callbacks.{name}", "init_args": args}
            for name, args in [
                ("AdapterCheckpoint", {"every_n_train_steps": 1, "dirpath": str(out / "adapters")}),
                ("ResumeCheckpoint", {"every_n_train_steps": 1, "dirpath": str(out / "ckpt")}),
            ]
        ]
        if checkpoints
        else None,
        enable_checkpointing=checkpoints,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(out / "tb")
    cfg["model"]["model"] = str(TINY)
    cfg["model"]["lora"]["dropout"] = 0.0  # dropout masks would differ between the runs
    cfg["model"]["grpo"].update(
        num_generations=G,
        batch_size=G * prompts_per_step,
        micro_batch_size=G,
        beta=0.04,
        loss_type="grpo",
        micro_batch_tokens=micro_batch_tokens,
    )
    cfg["model"]["optim"]["warmup_ratio"] = 0.0  # with 2 steps, any warmup makes the first lr 0
    # cosine varies with each completion's own length, so groups are never all-equal (zero advantages) even when
    # every answer is wrong; a batch-relative reward such as `length` would differ between the runs by design
    cfg["model"]["rewards"].append(
        {"name": "cosine", "weight": 1.0, "kwargs": {"max_len": 2 * MAX_NEW_TOKENS}}
    )
    if population is not None:
        cfg["model"]["population"] = population
    if dynamic:  # dynamic sampling on a reward that is often equal within a group (format): refills, the cap
        cfg["model"]["grpo"].update(dynamic_sampling=True, max_refill_rounds=2)
        cfg["model"]["rewards"] = [{"name": "format", "weight": 1.0}]
    cfg["data"]["val_source"] = None
    cfg["rollout"]["sampling"]["max_new_tokens"] = MAX_NEW_TOKENS
    cfg["rollout"]["engine"] = engine
    if engine == "vllm":
        cfg["rollout"]["vllm"] = {"kv_cache_gib": 0.25}
    path = out / f"config_{strategy}_world{world}_rank{rank}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class _Recorder:
    """Records what one process computed: per step its batch, completions, rewards, advantages, loss, adapter."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.initial_adapter: dict[str, torch.Tensor] = {}

    def install(self, cli: Any) -> None:
        import lightning as L

        from lightning_tina import grpo

        recorder = self
        rollout = next(c for c in cli.trainer.callbacks if type(c).__name__ == "RolloutCallback")
        source = rollout.source  # the RolloutSource the callback connects to the module
        rollouts, generate = source.rollouts, source.generate

        def recording_rollouts(batch, policy, *adapters):  # a population also names each prompt's adapter
            recorder.steps.append({"prompt_ids": batch.prompt_ids, "rows": batch.rows})
            return rollouts(batch, policy, *adapters)

        def recording_generate(prompt_ids, n, sampling, policy, *adapters):
            gens = generate(prompt_ids, n, sampling, policy, *adapters)
            recorder.steps[-1]["generations"] = [tuple(g) for g in gens]
            return gens

        source.rollouts = recording_rollouts  # on this instance only
        source.generate = recording_generate
        self._group_advantages = grpo.group_advantages

        def group_advantages(rewards, group_size, scale="group", eps=1e-4):
            adv = recorder._group_advantages(rewards, group_size, scale, eps)
            recorder.steps[-1].update(
                rewards=rewards.detach().cpu().clone(), advantages=adv.detach().cpu().clone()
            )
            return adv

        grpo.group_advantages = group_advantages
        optimizer_step = cli.model._optimizer_step

        def recording_optimizer_step(*args, **kwargs):
            out = optimizer_step(*args, **kwargs)
            recorder.steps[-1]["local_loss"] = float(out.loss)  # this rank's loss, before any logging sync
            policy = cli.model.policy  # gradients of the step just taken (DDP: already averaged over ranks)
            recorder.steps[-1]["grad"] = {
                n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None
            }
            return out

        cli.model._optimizer_step = recording_optimizer_step

        class _AfterStep(L.Callback):
            def on_train_start(self, trainer, pl_module) -> None:
                recorder.initial_adapter = _adapter(pl_module)

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                metrics = trainer.callback_metrics
                loss = "train/loss" if "train/loss" in metrics else f"train/loss/{POPULATION[0]['name']}"
                recorder.steps[-1]["loss"] = float(metrics[loss])
                if "engine/logprob_diff_mean" in metrics:  # vLLM: engine vs trainer log-probs
                    recorder.steps[-1]["engine_gap"] = float(metrics["engine/logprob_diff_mean"])
                recorder.steps[-1]["adapter"] = _adapter(pl_module)

        cli.trainer.callbacks.append(_AfterStep())

    def uninstall(self) -> None:
        from lightning_tina import grpo

        grpo.group_advantages = self._group_advantages


def _stop_after(steps: int) -> Any:
    """A callback that ends `fit` after `steps` optimizer steps, leaving the schedule's length unchanged."""
    import lightning as L

    class StopAfter(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step >= steps:
                trainer.should_stop = True

    return StopAfter()


def _adapter(pl_module: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pl_module.policy.named_parameters() if p.requires_grad}


def _worker(out: Path, strategy: str, mode: str = "") -> None:
    """One rank of the torchrun launch: fit the shrunk embedded default and save what it computed.

    mode "ckpt": also write adapters and resume checkpoints, and stop after STEPS of a STEPS + 1 schedule (as a
    pre-emption would); "resume": continue that run for its last step from out/ckpt/last.ckpt (results go to
    resumed_rank<r>.pt); "straight": the STEPS + 1 steps without a break; "vllm": a vLLM engine per rank;
    "packed": packed passes of at most PACKED_TOKENS tokens (ranks may run different numbers of passes);
    "dynamic": model.grpo.dynamic_sampling on a format-only reward (tests/test_rl_options.py); "population": a
    population of two adapters (POPULATION).
    """
    from lightning_tina.__main__ import cli_main
    from lightning_tina.policy import whole  # gathers FSDP2 shards (every rank, same order)

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    steps = STEPS + 1 if mode in ("ckpt", "resume", "straight") else STEPS
    config = _config(
        out,
        world,
        PROMPTS_PER_RANK,
        strategy,
        rank,
        steps,
        checkpoints=mode in ("ckpt", "resume"),
        engine="vllm" if mode == "vllm" else "hf",
        micro_batch_tokens=PACKED_TOKENS if mode == "packed" else None,
        dynamic=mode == "dynamic",
        population=POPULATION if mode == "population" else None,
    )
    cli = cli_main(["--config", str(config)], run=False)
    recorder = _Recorder()
    recorder.install(cli)
    if mode == "ckpt":
        cli.trainer.callbacks.append(_stop_after(STEPS))
    t0 = time.perf_counter()
    ckpt = str(out / "ckpt" / "last.ckpt") if mode == "resume" else None
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    steps = [
        {**step, **{k: {n: whole(w) for n, w in step.get(k, {}).items()} for k in ("adapter", "grad")}}
        for step in recorder.steps
    ]
    initial = {n: whole(w) for n, w in recorder.initial_adapter.items()}
    torch.save(
        {
            "steps": steps,
            "initial_adapter": initial,
            "fit_s": time.perf_counter() - t0,
            "group_alive": torch.distributed.is_initialized(),  # the engines' shutdown left it to the trainer
        },
        out / f"{'resumed_' if mode == 'resume' else ''}rank{rank}.pt",
    )


class _ReplayEngine:
    """A RolloutEngine that returns recorded completions in call order (rank 0's then rank 1's per step)."""

    def __init__(self, per_call: list[list[tuple]]) -> None:
        self.per_call = list(per_call)

    def sync(self, policy: torch.nn.Module, version: int) -> None:
        pass

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: Any) -> list:
        from lightning_tina.types import Generation

        gens = self.per_call.pop(0)
        assert len(gens) == len(prompt_ids) * n
        return [Generation(*g) for g in gens]

    def close(self) -> None:
        pass


def _replay_single_process(out: Path, ranks: list[dict[str, Any]]) -> _Recorder:
    """Fit 1 process on the union of the ranks' prompts and completions, one step per recorded step."""
    import lightning as L

    from lightning_tina.__main__ import cli_main
    from lightning_tina.types import PromptBatch

    batches, calls = [], []
    for s in range(STEPS):
        parts = [r["steps"][s] for r in ranks]
        batches.append(
            PromptBatch(
                prompt_ids=[i for p in parts for i in p["prompt_ids"]],
                rows=[row for p in parts for row in p["rows"]],
            )
        )
        calls.append([g for p in parts for g in p["generations"]])

    class _Replay(L.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)

    cli = cli_main(["--config", str(_config(out, 1, PROMPTS_PER_RANK * len(ranks)))], run=False)
    rollout = next(c for c in cli.trainer.callbacks if type(c).__name__ == "RolloutCallback")
    rollout.engine = _ReplayEngine(calls)
    recorder = _Recorder()
    recorder.install(cli)
    try:
        cli.trainer.fit(cli.model, datamodule=_Replay())
    finally:
        recorder.uninstall()
    return recorder


def _launch(out: Path, strategy: str, mode: str = "") -> list[dict[str, Any]]:
    """torchrun this file on 2 CPU processes (gloo) and load what each rank recorded."""
    if not TINY.exists():
        pytest.skip(f"the embedded tiny model {TINY} is not built yet")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    proc = subprocess.run(
        [*cmd, str(out), strategy, mode], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"torchrun exited with {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-6000:]}"
        )
    prefix = "resumed_" if mode == "resume" else ""
    return [torch.load(out / f"{prefix}rank{r}.pt", weights_only=False) for r in range(2)]


def test_group_advantages_are_exact_when_whole_groups_live_on_one_rank():
    """Normalizing per rank equals normalizing the whole batch iff no group is split across ranks."""
    from lightning_tina.grpo import group_advantages

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.0, 2.0])  # 2 prompts x G=4, group-major
    whole = group_advantages(rewards, 4)  # [8]
    per_rank = torch.cat(
        [group_advantages(rewards[:4], 4), group_advantages(rewards[4:], 4)]
    )  # rank 0 | rank 1
    assert torch.equal(whole, per_rank)
    # a sampler that spread one prompt's completions over two ranks would need a gather (TRL's design) ...
    halves = torch.cat([group_advantages(rewards[i : i + 2], 2) for i in range(0, 8, 2)])
    assert not torch.allclose(whole, halves)  # ... because normalizing the halves separately is wrong


@pytest.mark.parametrize("script", ["scripts/torchrun.sh", "scripts/slurm/tina.slurm"])
def test_launch_scripts_parse_and_pass_the_topology_to_the_trainer(script):
    text = (ROOT / script).read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True).returncode == 0
    assert "--trainer.num_nodes" in text and "--trainer.devices" in text and "-m lightning_tina fit" in text
    if script.endswith(".slurm"):  # Lightning's SLURM environment needs one task per GPU
        sbatch = dict(
            line[8:].lstrip("-").split("=", 1) for line in text.splitlines() if line.startswith("#SBATCH --")
        )
        assert sbatch["ntasks-per-node"] == sbatch["gpus-per-node"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[list[dict[str, Any]], _Recorder]:
    out = tmp_path_factory.mktemp("ddp")
    ranks = _launch(out, "ddp")
    return ranks, _replay_single_process(out, ranks)


def _assert_matches_single_process(ranks: list[dict[str, Any]], single: _Recorder) -> None:
    """What 2 data-parallel ranks computed equals 1 process fitting the union of their prompts and completions."""
    for s in range(STEPS):
        # group advantages: rank r's groups are exactly rows r*B*G .. of the 1-process batch
        adv_ddp = torch.cat([r["steps"][s]["advantages"] for r in ranks])
        torch.testing.assert_close(single.steps[s]["advantages"], adv_ddp, rtol=0, atol=0)
        # per-sequence loss over equal halves: the 1-process loss is the mean of the ranks' losses
        mean_loss = sum(r["steps"][s]["local_loss"] for r in ranks) / len(ranks)
        assert single.steps[s]["local_loss"] == pytest.approx(mean_loss, rel=1e-5, abs=1e-7), s
        # and what every rank logs (train/loss, reduced across ranks) is that mean
        for r in ranks:
            assert r["steps"][s]["loss"] == pytest.approx(mean_loss, rel=1e-6, abs=1e-9), s
        # the averaged gradient is the 1-process gradient (summation order aside) ...
        grads = single.steps[s]["grad"]
        scale = max(g.abs().max().item() for g in grads.values())
        for name, g in grads.items():  # float32 sums in another order: measured up to 1.2e-5 x scale
            torch.testing.assert_close(ranks[0]["steps"][s]["grad"][name], g, rtol=1e-4, atol=1e-4 * scale)
        # ... and so are the weights after the update. Adam divides each gradient by its own RMS (plus eps 1e-8),
        # so a 1e-8 rounding difference of a near-zero gradient moves a weight by up to ~lr / 100 (measured with
        # sharded prompts); unsynchronized gradients would move weights by ~lr. Allow lr / 10.
        lr = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"]["optim"]["lr"]
        for name, w in single.steps[s]["adapter"].items():
            torch.testing.assert_close(ranks[0]["steps"][s]["adapter"][name], w, rtol=1e-4, atol=lr / 10)
    moved = [
        n
        for n, w in ranks[0]["steps"][-1]["adapter"].items()
        if not torch.equal(w, ranks[0]["initial_adapter"][n])
    ]
    assert moved, "the adapter did not change: the comparison would be vacuous"


@pytest.mark.slow
def test_ddp_matches_single_process_on_the_same_data(ddp_run):
    _assert_matches_single_process(*ddp_run)


@pytest.mark.slow
def test_ddp_ranks_keep_identical_adapters(ddp_run):
    ranks, _ = ddp_run
    for s in range(STEPS):
        a, b = ranks[0]["steps"][s]["adapter"], ranks[1]["steps"][s]["adapter"]
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (s, name)


@pytest.mark.slow
def test_each_group_is_sampled_and_normalized_on_one_rank(ddp_run):
    ranks, _ = ddp_run
    for r in ranks:
        for step in r["steps"]:
            b = len(step["prompt_ids"])
            assert len(step["generations"]) == b * G and step["advantages"].shape == (b * G,)
            grouped = step["rewards"].view(b, G)
            expected = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
            torch.testing.assert_close(step["advantages"].view(b, G), expected)


@pytest.mark.slow
def test_ranks_roll_out_different_prompts(ddp_run):
    ranks, _ = ddp_run
    for s in range(STEPS):
        assert ranks[0]["steps"][s]["prompt_ids"] != ranks[1]["steps"][s]["prompt_ids"], s


POPULATION = [{"name": "slow", "optim": {"lr": 1.0e-3}}, {"name": "wide", "lora": {"r": 8, "alpha": 16}}]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_population_keeps_every_adapter_identical_across_ranks(tmp_path, strategy):
    """Each adapter of a population trains on both ranks' rows: DDP (the module averages each adapter's gradients
    itself, since every backward reaches one adapter only) and FSDP2 keep the ranks' adapters identical."""
    ranks = _launch(tmp_path, strategy, "population")
    if ranks[0]["steps"][0]["prompt_ids"] == ranks[1]["steps"][0]["prompt_ids"]:
        pytest.fail("the ranks saw the same prompts, so unsynchronized gradients could not show")
    first, last = ranks[0]["initial_adapter"], ranks[0]["steps"][-1]["adapter"]
    for adapter in ("slow", "wide"):
        names = [n for n in last if f".{adapter}." in n]
        assert names and any(not torch.equal(first[n], last[n]) for n in names), adapter  # it trained
    for s in range(STEPS):
        a, b = ranks[0]["steps"][s]["adapter"], ranks[1]["steps"][s]["adapter"]
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


@pytest.mark.slow
def test_fsdp2_matches_single_process_and_keeps_ranks_identical(tmp_path):
    """ModelParallelStrategy (FSDP2, gloo): ranks with different data stay identical and match 1 process."""
    ranks = _launch(tmp_path, "fsdp")
    if ranks[0]["steps"][0]["prompt_ids"] == ranks[1]["steps"][0]["prompt_ids"]:
        pytest.fail("the ranks saw the same prompts, so unsynchronized gradients could not show")
    for s in range(STEPS):
        a, b = ranks[0]["steps"][s]["adapter"], ranks[1]["steps"][s]["adapter"]
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    _assert_matches_single_process(ranks, _replay_single_process(tmp_path, ranks))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_packed_passes_under_ddp_and_fsdp2_match_count_based_single_process(tmp_path, strategy):
    """micro_batch_tokens on 2 ranks: each rank plans its own packed passes (DDP: possibly a different number,
    only the last backward all-reduces; FSDP2: padded to the most passes, since every forward gathers weights),
    and the result equals 1 process with count-based micro-batches on the union of the data."""
    ranks = _launch(tmp_path, strategy, "packed")
    for s in range(STEPS):
        a, b = ranks[0]["steps"][s]["adapter"], ranks[1]["steps"][s]["adapter"]
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    _assert_matches_single_process(ranks, _replay_single_process(tmp_path, ranks))


@pytest.mark.slow
def test_fsdp2_saves_peft_adapters_and_resumes(tmp_path):
    """Under FSDP2 the sharded adapter is gathered into a standard PEFT folder, and `last.ckpt` resumes it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ranks = _launch(tmp_path, "fsdp", "ckpt")
    saved = tmp_path / "adapters" / f"step-{STEPS:06d}"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY), saved)
    loaded = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    trained = ranks[0]["steps"][-1]["adapter"]  # gathered full tensors, named as in the PEFT model
    assert loaded.keys() == trained.keys() and trained
    for name, w in trained.items():
        torch.testing.assert_close(loaded[name], w, rtol=0, atol=0)
    resumed = _launch(tmp_path, "fsdp", "resume")
    for r in range(2):  # the resumed run starts from the saved adapter and takes one more step
        assert len(resumed[r]["steps"]) == 1
        for name, w in trained.items():
            torch.testing.assert_close(resumed[r]["initial_adapter"][name], w, rtol=0, atol=0)
    assert (tmp_path / "adapters" / f"step-{STEPS + 1:06d}" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_vllm_engine_per_rank(tmp_path, strategy):
    """Each rank runs its own in-process vLLM engine; every engine serves the weights just trained (under FSDP2
    the sync gathers the sharded weights on every rank)."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e .[cpu] or .[gpu])")
    ranks = _launch(tmp_path, strategy, "vllm")
    assert all(r["group_alive"] for r in ranks), "vLLM's shutdown destroyed the trainer's process group"
    for s in range(STEPS):
        assert ranks[0]["steps"][s]["prompt_ids"] != ranks[1]["steps"][s]["prompt_ids"], s
        a, b = ranks[0]["steps"][s]["adapter"], ranks[1]["steps"][s]["adapter"]
        assert all(torch.equal(a[n], b[n]) for n in a), s
        for (
            r
        ) in ranks:  # logged as the mean over ranks; stale weights give 0.1-0.9 (tests/test_vllm_engine.py)
            assert r["steps"][s]["engine_gap"] < 1e-4, (s, r["steps"][s]["engine_gap"])


@pytest.mark.slow
def test_ddp_resume_continues_every_rank_exactly(tmp_path):
    """2 steps + `last.ckpt` + 1 resumed step equal 3 straight steps on each rank: each rank gets back its own
    stream position and sampling RNG, not rank 0's."""
    straight_dir, split_dir = tmp_path / "straight", tmp_path / "split"
    straight_dir.mkdir()
    split_dir.mkdir()
    straight = _launch(straight_dir, "ddp", "straight")
    _launch(split_dir, "ddp", "ckpt")
    resumed = _launch(split_dir, "ddp", "resume")
    assert straight[0]["steps"][STEPS]["prompt_ids"] != straight[1]["steps"][STEPS]["prompt_ids"]
    for r in range(2):
        want, got = straight[r]["steps"][STEPS], resumed[r]["steps"][0]
        assert got["prompt_ids"] == want["prompt_ids"], r
        assert got["generations"] == want["generations"], r
        assert got["loss"] == want["loss"], r
        for name, w in want["adapter"].items():
            assert torch.equal(got["adapter"][name], w), (r, name)


@pytest.mark.slow
def test_torchrun_script_trains_the_embedded_default_on_two_cpu_processes(tmp_path):
    if not TINY.exists():
        pytest.skip(f"the embedded tiny model {TINY} is not built yet")
    config = _config(tmp_path, 2, PROMPTS_PER_RANK)
    env = dict(os.environ, GPUS_PER_NODE="2", PYTHON=sys.executable)
    cmd = ["bash", str(ROOT / "scripts" / "torchrun.sh"), str(config), "--trainer.accelerator", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


def _mixed_dtype_worker(out: Path) -> None:
    """One rank: FSDP2 over a PEFT policy whose units hold a bfloat16 base and float32 LoRA weights (Tina's
    bf16 setting), one forward/backward under bf16 autocast on the rank's half of a fixed batch."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from lightning_tina.policy import shard_fsdp2, whole

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
    policy, ids = _mixed_dtype_policy_and_batch()
    shard_fsdp2(policy, mesh)
    dtypes = {n: p.dtype for n, p in policy.named_parameters()}
    sharded = all(isinstance(p, DTensor) for p in policy.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = policy(input_ids=ids[2 * rank : 2 * rank + 2]).logits  # [2, T, V]
    logits.float().log_softmax(-1).mean().backward()  # FSDP2 averages the ranks' gradients
    grads = {n: whole(p.grad).float() for n, p in policy.named_parameters() if p.grad is not None}
    torch.save({"dtypes": dtypes, "sharded": sharded, "grads": grads}, out / f"mixed_rank{rank}.pt")
    dist.destroy_process_group()


def _mixed_dtype_policy_and_batch() -> tuple[torch.nn.Module, torch.Tensor]:
    from lightning_tina.policy import LoRASettings, load_causal_lm, wrap_lora

    torch.manual_seed(0)
    policy = wrap_lora(load_causal_lm(str(TINY), "bfloat16"), LoRASettings(r=8, alpha=16, dropout=0.0))
    for name, p in policy.named_parameters():
        if "lora_B" in name:  # a non-zero adapter, so that lora_A gets gradients too
            p.data.normal_(0, 0.05)
    return policy, torch.randint(3, 200, (4, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
def test_fsdp2_shards_a_bf16_base_with_float32_lora_in_one_unit(tmp_path):
    """Issue 17: Tina trains a bfloat16 base with float32 LoRA weights; under FSDP2 every decoder layer is one unit
    holding both dtypes. The sharded run keeps each parameter's dtype and its gradients equal the 1-process
    gradients of the whole batch (bf16 matmuls on half the rows: rounding only)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    proc = subprocess.run(
        [*cmd, str(tmp_path), "fsdp2-mixed"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"mixed_rank{r}.pt", weights_only=False) for r in range(2)]
    policy, ids = _mixed_dtype_policy_and_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = policy(input_ids=ids).logits
    logits.float().log_softmax(-1).mean().backward()
    expected = {n: p.grad.float() for n, p in policy.named_parameters() if p.grad is not None}
    for rec in ranks:
        assert rec["sharded"]
        assert {n for n, d in rec["dtypes"].items() if d == torch.float32} == set(expected)  # LoRA only
        assert {d for n, d in rec["dtypes"].items() if n not in expected} == {torch.bfloat16}
        assert set(rec["grads"]) == set(expected)
        for name, g in expected.items():
            got = rec["grads"][name]
            assert (got - g).norm() <= 0.02 * g.norm() + 1e-8, name
        assert ranks[0]["grads"].keys() == rec["grads"].keys()


if __name__ == "__main__":
    if sys.argv[2] == "fsdp2-mixed":
        _mixed_dtype_worker(Path(sys.argv[1]))
    else:
        _worker(Path(sys.argv[1]), *sys.argv[2:4])
