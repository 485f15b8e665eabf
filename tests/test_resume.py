"""Exact resume: 6 steps straight == 3 steps, a hard kill, and `fit --ckpt_path last` for 3 more."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "data" / "tiny"


def _config(tmp: Path, name: str, kill_at: int | None = None, population: list | None = None) -> Path:
    cfg = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    if population is not None:
        cfg["model"]["population"] = population
    cfg["model"]["model"] = str(TINY)
    cfg["model"]["grpo"].update(batch_size=16, micro_batch_size=8)
    cfg["model"]["lora"]["dropout"] = 0.05  # exercises the RNG of the training forward too
    cfg["rollout"]["sampling"]["max_new_tokens"] = 32
    cfg["trainer"].update(max_steps=6, enable_progress_bar=False)
    cfg["trainer"]["logger"]["init_args"].update(save_dir=str(tmp / "tb"), name=name)
    cfg["trainer"]["callbacks"] = [
        {
            "class_path": "lightning_tina.callbacks.ResumeCheckpoint",
            "init_args": {"dirpath": str(tmp / name / "ckpt"), "every_n_train_steps": 1},
        },
        {
            "class_path": "lightning_tina.callbacks.AdapterCheckpoint",
            "init_args": {"dirpath": str(tmp / name / "adapters"), "every_n_train_steps": 0},
        },
    ]
    if kill_at is not None:
        cfg["trainer"]["callbacks"].append(
            {"class_path": "faults.KillAtStep", "init_args": {"step": kill_at}}
        )
    cfg["trainer"]["enable_checkpointing"] = True
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests" / "helpers"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lightning_tina", "fit", "--config", str(config), *extra]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _losses(tb_dir: Path, tag: str = "train/loss") -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, float] = {}
    for events in sorted(tb_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for ev in acc.Scalars(tag) if tag in acc.Tags()["scalars"] else []:
            out[ev.step] = ev.value
    return out


POPULATION = [{"name": "slow", "optim": {"lr": 1.0e-3}}, {"name": "wide", "lora": {"r": 8, "alpha": 16}}]


@pytest.mark.slow
@pytest.mark.parametrize("population", [None, POPULATION], ids=["solo", "population"])
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, population):
    straight = _fit(_config(tmp_path, "straight", population=population))
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = _fit(_config(tmp_path, "resumed", kill_at=3, population=population))
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    assert (tmp_path / "resumed/ckpt/last.ckpt").exists()
    assert not list((tmp_path / "resumed/ckpt").glob("*.tmp"))

    resumed = _fit(_config(tmp_path, "resumed", population=population), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    names = [m["name"] for m in population] if population else [None]
    for name in names:  # every adapter of a population resumes exactly
        tag = "train/loss" if name is None else f"train/loss/{name}"
        a = _losses(tmp_path / "tb" / "straight", tag)
        b = _losses(tmp_path / "tb" / "resumed", tag)
        assert sorted(a) == sorted(b) and len(a) == 6, (name, a, b)
        for step in a:  # CPU kernels are deterministic here: bit-identical
            assert a[step] == b[step], (name, step, a[step], b[step])

        folder = "step-*" if name is None else f"{name}/step-*"
        wa = load_file(next((tmp_path / "straight/adapters").glob(f"{folder}/adapter_model.safetensors")))
        wb = load_file(next((tmp_path / "resumed/adapters").glob(f"{folder}/adapter_model.safetensors")))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_preemption_signal_saves_and_exits_cleanly(tmp_path, sig):
    run = _fit(_signal_config(tmp_path, sig))
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = torch.load(tmp_path / "pre/ckpt/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3  # the signal arrives as step 3 starts; step 3 finishes, then the save
    assert all("lora_" in k for k in ckpt["state_dict"])  # only the adapter is stored


def _signal_config(tmp: Path, sig: str) -> Path:
    path = _config(tmp, "pre", kill_at=2)
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 100
    cfg["trainer"]["callbacks"][-1]["init_args"]["sig"] = sig
    path.write_text(yaml.safe_dump(cfg))
    return path
