"""The bench scripts still run: each one, on the shipped tiny model with tiny settings (no timing assertions)."""

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
TINY = BENCH.parent / "data" / "tiny"

pytestmark = pytest.mark.skipif(
    not (TINY / "config.json").exists(), reason="data/tiny (the shipped model) is missing"
)


def _script(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def _record(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith("JSON ")]
    assert lines, f"no JSON line in the output:\n{out[-2000:]}"
    return json.loads(lines[-1][len("JSON ") :])


def test_step_breakdown_hf_step(capsys):
    _script("step_breakdown").main(
        [
            "--size",
            "tiny",
            "--engine",
            "hf",
            "--prompts",
            "2",
            "--generations",
            "2",
            "--tokens",
            "6",
            "--steps",
            "1",
        ]
    )
    r = _record(capsys.readouterr().out)
    assert r["bench"] == "step_breakdown" and r["engine"] == "hf"
    assert set(r["median_s"]) >= {
        "rollout",
        "reward",
        "ref_logps",
        "policy_forward",
        "backward",
        "optimizer",
        "step",
    }
    assert r["tokens_per_s"] > 0 and r["peak_rss_gb"] > 0


def test_step_breakdown_synthetic_training_part(capsys):
    _script("step_breakdown").main(
        ["--size", "tiny", "--synthetic", "--prompts", "2", "--generations", "2", "--tokens", "8"]
        + ["--prompt-tokens", "4", "--micro-batch", "3", "--steps", "1", "--precision", "bf16"]
        + ["--length-spread", "0.5", "--no-fused-lora", "--no-fused-norm"]
    )
    r = _record(capsys.readouterr().out)
    assert r["median_s"]["rollout"] == 0 and r["train_tokens_per_s"] > 0
    assert r["settings"]["length_spread"] == 0.5 and not r["settings"]["no_trim_padding"]
    assert r["settings"]["no_fused_lora"] and r["settings"]["no_fused_norm"]


def test_logprob_memory_worker(capsys):
    _script("logprob_memory").main(
        ["--chunk", "16", "--batch", "2", "--tokens", "40", "--vocab", "500", "--hidden", "8"]
    )
    r = _record(capsys.readouterr().out)
    assert r["chunk_tokens"] == 16 and r["logps_shape"] == [2, 40] and r["peak_gb"] > 0


def test_vs_trl_lightning_tina_worker(capsys):
    _script("vs_trl").main(
        [
            "--worker",
            "lt",
            "--engine",
            "hf",
            "--model",
            str(TINY),
            "--steps",
            "1",
            "--warmup",
            "1",
            "--tokens",
            "6",
        ]
    )
    r = _record(capsys.readouterr().out)
    assert r["tool"] == "lt" and len(r["step_s"]) == 1 and r["completion_length"] == [6.0]


@pytest.mark.slow
def test_vs_trl_trl_worker(capsys):
    pytest.importorskip("trl", reason="TRL is the bench extra: pip install -e .[bench]")
    _script("vs_trl").main(
        ["--worker", "trl", "--model", str(TINY), "--steps", "1", "--warmup", "1", "--tokens", "6"]
    )
    r = _record(capsys.readouterr().out)
    assert r["tool"] == "trl" and len(r["step_s"]) == 1 and r["completion_length"] == [6.0]


@pytest.mark.slow
def test_vs_trl_trl_training_part_worker(capsys):
    pytest.importorskip("trl", reason="TRL is the bench extra: pip install -e .[bench]")
    _script("vs_trl").main(
        ["--worker", "trl-train", "--model", str(TINY), "--steps", "1", "--warmup", "1", "--tokens", "6"]
        + ["--prompts", "2", "--prompt-tokens", "4", "--micro-batch", "4", "--precision", "bf16"]
        + ["--gradient-checkpointing"]
    )
    r = _record(capsys.readouterr().out)
    assert r["tool"] == "trl-train" and r["train_tokens_per_s"] > 0


def test_population_generate_compares_the_three_ways(capsys):
    _script("population_generate").main(
        ["--adapters", "2", "--prompts", "2", "--generations", "2", "--max-new-tokens", "8", "--repeats", "1"]
    )
    out = capsys.readouterr().out
    for way in ("solo (one adapter)", "routed", "peft", "per_adapter"):
        assert any(line.startswith(way) for line in out.splitlines()), out
