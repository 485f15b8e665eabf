"""The RolloutSource seam: the engine-backed source syncs on version changes only; a replay source replays."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lightning_tina.rollout import VLLMConfig
from lightning_tina.rollout import source as source_file
from lightning_tina.rollout.base import EngineSpec, PolicyHandle, RolloutSource, SamplingConfig
from lightning_tina.rollout.source import EngineRollouts, ReplayRollouts
from lightning_tina.types import Generation, PromptBatch


class _Policy:
    """A PolicyHandle without a model: a version the test bumps, and a tokenizer that pads with 0."""

    def __init__(self) -> None:
        self.tokenizer = SimpleNamespace(
            pad_token_id=0, eos_token_id=9, decode=lambda ids, **_: str(list(ids))
        )
        self.version = 0
        self.weights = object()

    def engine_spec(self) -> EngineSpec:
        return EngineSpec("some/model", "float32", 4)

    def current_policy(self):
        return self.weights, self.version


class _Engine:
    def __init__(self) -> None:
        self.synced: list[int] = []

    def sync(self, policy, version: int) -> None:
        self.synced.append(version)

    def generate(self, prompt_ids, n, sampling):
        return [Generation([5, 9], None, "stop") for _ in range(len(prompt_ids) * n)]

    def close(self) -> None:
        pass


def test_engine_source_is_built_once_and_synced_when_the_version_changes(monkeypatch):
    built: list[dict] = []
    engine = _Engine()
    monkeypatch.setattr(source_file, "make_engine", lambda name, **kw: built.append(kw) or engine)
    policy = _Policy()
    src = EngineRollouts("hf", SamplingConfig(max_new_tokens=4), 2, VLLMConfig())
    assert isinstance(src, RolloutSource) and isinstance(policy, PolicyHandle)
    batch = PromptBatch(prompt_ids=[[1, 2], [3]], rows=[{"solution": "1"}, {"solution": "2"}])
    r = src.rollouts(batch, policy)
    assert r.input_ids.shape == (4, 4) and r.completion_mask.sum() == 8
    src.generate([[1]], 3, SamplingConfig(), policy)
    policy.version = 1
    src.rollouts(batch, policy)
    assert len(built) == 1 and built[0]["lora_rank"] == 4 and built[0]["model_name"] == "some/model"
    assert engine.synced == [0, 1]  # once per version, not per call
    assert src.max_new_tokens == 4 and "perf/rollout_tokens_per_s" in src.perf


def test_replay_source_replays_steps_and_evaluation_generations():
    policy = _Policy()
    gens = [Generation([5, 9], None, "stop"), Generation([6, 6, 6], None, "length")]
    src = ReplayRollouts([gens], group_size=2, max_new_tokens=3, eval_generations=gens)
    batch = PromptBatch(prompt_ids=[[1, 2]], rows=[{"solution": "1"}])
    first, second = src.rollouts(batch, policy), src.rollouts(batch, policy)
    assert src.calls == 2 and first.truncated.tolist() == second.truncated.tolist() == [False, True]
    assert [g.token_ids for g in src.generate([[1]], 2, SamplingConfig(), policy)] == [[5, 9], [6, 6, 6]]
    with pytest.raises(RuntimeError, match="3 were asked for|eval generations"):
        src.generate([[1]], 3, SamplingConfig(), policy)
    with pytest.raises(RuntimeError, match="no eval_generations"):
        ReplayRollouts([gens], 2, 3).generate([[1]], 2, SamplingConfig(), policy)


def test_sampling_config_checks_each_field_when_built():
    with pytest.raises(ValueError, match="sampling.top_p=1.5"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ValueError, match="sampling.min_new_tokens=5 must be between 0 and max_new_tokens"):
        SamplingConfig(max_new_tokens=4, min_new_tokens=5)


def test_callback_stops_a_gpu_run_whose_engine_log_probs_drift_and_takes_the_worst_rank():
    """The freshness check: RolloutCallback reads the step's logged engine/logprob_diff_mean, reduces it with max over
    the ranks (so every rank raises together) and stops a GPU run past rollout.vllm.max_logprob_diff; CPU engines,
    other engines and steps without the metric pass."""
    import torch

    from lightning_tina.callbacks.rollout import RolloutCallback
    from lightning_tina.rollout.vllm import VLLMEngine

    reduced: list[str] = []

    def reduce(t, reduce_op="mean"):
        reduced.append(reduce_op)
        return t * 3  # another rank's gap is three times this one's

    def trainer(diff):
        metrics = {} if diff is None else {"engine/logprob_diff_mean": torch.tensor(diff)}
        strategy = SimpleNamespace(reduce=reduce, root_device=torch.device("cpu"))
        return SimpleNamespace(callback_metrics=metrics, strategy=strategy)

    cb = RolloutCallback(engine="vllm", vllm=VLLMConfig(max_logprob_diff=0.1))
    engine = VLLMEngine.__new__(VLLMEngine)  # no vLLM start: only the attributes the check reads
    engine.on_gpu = True
    cb.engine = engine
    cb._check_freshness(trainer(0.02))  # 0.06 after the max over ranks: fine
    assert reduced == ["max"]
    with pytest.raises(RuntimeError, match="rollout.vllm.max_logprob_diff=0.1"):
        cb._check_freshness(trainer(0.05))  # this rank 0.05, the worst rank 0.15
    cb._check_freshness(trainer(None))  # a step without engine log-probs
    engine.on_gpu = False
    cb._check_freshness(trainer(5.0))  # CPU: tests hold the engine to 1e-4 instead
    cb.engine = _Engine()
    cb._check_freshness(trainer(5.0))  # not a vLLM engine
    assert reduced == ["max", "max"]
