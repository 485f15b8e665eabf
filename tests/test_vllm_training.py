"""GRPO with the colocated vLLM engine: rollouts come from the current adapter at every step (issue 5)."""

from pathlib import Path

import pytest
import yaml

from lightning_tina.__main__ import cli_main

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[1]


def _scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for events in log_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def test_fit_with_vllm_logs_fresh_logprobs_and_tis(tmp_path):
    pytest.importorskip("vllm")
    cfg = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    cfg["trainer"].update(max_steps=3, enable_progress_bar=False)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    cfg["trainer"]["callbacks"] = [
        {
            "class_path": "lightning_tina.callbacks.BenchmarkEval",
            "init_args": {"benchmarks": ["tiny_heldout"], "limit": 8, "k": 2},
        },
    ]
    cfg["trainer"]["enable_checkpointing"] = False
    cfg["model"]["grpo"].update(batch_size=32, tis_cap=2.0)
    cfg["model"]["optim"].update(lr=0.01, warmup_ratio=0.0)  # large enough to move the policy every step
    cfg["rollout"]["engine"] = "vllm"
    path = tmp_path / "vllm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = cli_main(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 3
    s = _scalars(tmp_path)
    # every step's rollouts were scored by the trainer within fp32 noise of what vLLM sampled them with
    assert sorted(s["engine/logprob_diff_mean"]) == [0, 1, 2]
    assert max(s["engine/logprob_diff_mean"].values()) < 1e-4, s["engine/logprob_diff_mean"]
    assert max(s["engine/logprob_diff_max"].values()) < 1e-3, s["engine/logprob_diff_max"]
    assert all(abs(v - 1) < 1e-3 for v in s["engine/tis_weight_mean"].values())
    # and the policy did move: the adapter's version changed every step
    assert cli.model.policy_version == 3
    assert "bench/tiny_heldout/pass@1" in s
