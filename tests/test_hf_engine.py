"""The Hugging Face `generate` rollout engine: min_new_tokens, and synced_gpus for FSDP2-sharded models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_tina.rollout.base import SamplingConfig

TEMPERATURE = 0.7


def test_hf_engine_min_new_tokens(tiny_model: Path, tiny_prompts: list[list[int]]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_tina.rollout.hf import HFEngine

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    engine, prompts, n = HFEngine(model, tok), tiny_prompts, 4
    free = engine.generate(prompts, n, SamplingConfig(max_new_tokens=96, temperature=TEMPERATURE, seed=3))
    stopped = [len(g.token_ids) for g in free if g.finish_reason == "stop"]
    assert stopped, "no completion reached EOS: the check below would prove nothing"
    m = min(stopped) + 1  # at least one completion stopped before m tokens
    forced = engine.generate(
        prompts, n, SamplingConfig(max_new_tokens=96, temperature=TEMPERATURE, seed=3, min_new_tokens=m)
    )
    assert all(len(g.token_ids) >= m and tok.eos_token_id not in g.token_ids[:m] for g in forced)
    with pytest.raises(ValueError, match="min_new_tokens"):
        engine.generate(prompts, n, SamplingConfig(max_new_tokens=4, min_new_tokens=5))


def test_hf_engine_syncs_ranks_for_fsdp2_models(
    tiny_model: Path, tiny_prompts: list[list[int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """synced_gpus=True exactly when parameters are DTensors and the process group has more than one rank; and
    HFEngine passes the decision to generate."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_tina.rollout import hf
    from lightning_tina.rollout.hf import HFEngine, needs_synced_gpus

    plain = torch.nn.Linear(4, 4)
    assert not needs_synced_gpus(plain)  # no process group
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        sharded = torch.nn.Linear(4, 4)
        mesh = init_device_mesh("cpu", (1,))
        sharded.weight = torch.nn.Parameter(distribute_tensor(sharded.weight.detach(), mesh, [Replicate()]))
        assert not needs_synced_gpus(sharded)  # one rank: nothing to wait for
        monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
        assert needs_synced_gpus(sharded) and not needs_synced_gpus(plain)
    finally:
        dist.destroy_process_group()

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    seen: list[object] = []
    real_generate = model.generate

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(kwargs.pop("synced_gpus", None))  # recorded, not used: this process has no process group
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    engine = HFEngine(model, AutoTokenizer.from_pretrained(tiny_model))
    monkeypatch.setattr(hf, "needs_synced_gpus", lambda m: True)
    engine.generate(tiny_prompts[:1], 1, SamplingConfig(max_new_tokens=2))
    monkeypatch.setattr(hf, "needs_synced_gpus", lambda m: False)
    engine.generate(tiny_prompts[:1], 1, SamplingConfig(max_new_tokens=2))
    assert seen == [True, None]  # None: transformers' own choice
