"""The trainer's log-prob temperature (model.grpo.logprob_temperature), separate from the sampling temperature.

Tina's trainer (TRL 0.15.2 `_get_per_token_logps`) takes log-probs of the raw logits while sampling at 0.7; the Tina
recipes set logprob_temperature 1.0, everything else keeps None (= the sampling temperature). The engine's log-probs
must be of the same kind (`rollout.vllm.engine_logprobs`: "raw" or "processed"), which the CLI links and the rollout
callback checks.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_tina.__main__ import cli_main
from lightning_tina.grpo import GRPOSettings

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "data" / "tiny"


def _module(logprob_temperature: float | None):
    from lightning_tina.module import GRPOModule

    settings = GRPOSettings(
        num_generations=2,
        batch_size=2,
        micro_batch_size=2,
        temperature=0.7,
        logprob_temperature=logprob_temperature,
    )
    module = GRPOModule(model=str(TINY), grpo=settings)
    module.configure_model()
    return module


@pytest.mark.parametrize(("logprob_temperature", "divisor"), [(1.0, 1.0), (None, 0.7), (0.5, 0.5)])
def test_module_logprobs_use_the_logprob_temperature(logprob_temperature, divisor):
    if not TINY.exists():
        pytest.skip("data/tiny is not built")
    module = _module(logprob_temperature)
    assert module.grpo.logprob_temp == divisor
    torch.manual_seed(0)
    vocab = module.policy.get_base_model().config.vocab_size
    ids = torch.randint(3, vocab, (2, 12))
    ids[1] = ids[0]  # one group: both rows share the prompt (the shared-prompt path)
    ids[1, -4:] = torch.randint(3, vocab, (4,))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got, _ = module.sequence_logprobs(module.policy, ids, mask, 4, with_entropy=False)
        logits = module.policy(input_ids=ids, attention_mask=mask).logits[:, -5:-1].float()  # [2, 4, V]
    want = torch.log_softmax(logits / divisor, -1).gather(-1, ids[:, -4:, None]).squeeze(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _engine_logprobs(*args: str) -> str:
    """rollout.vllm.engine_logprobs as the CLI resolves it (linked from model.grpo, never set by hand)."""
    cli = cli_main(["--config", str(ROOT / "configs/tiny.yaml"), *args], run=False)
    return cli.config.rollout.vllm.engine_logprobs


def test_cli_links_engine_logprobs_from_the_logprob_temperature():
    if not TINY.exists():
        pytest.skip("data/tiny is not built")
    assert _engine_logprobs() == "processed"  # make tiny: log-probs at the sampling temperature (0.7)
    assert _engine_logprobs("--model.grpo.logprob_temperature", "1.0") == "raw"
    assert _engine_logprobs("--model.grpo.logprob_temperature", "0.7") == "processed"
    assert (
        _engine_logprobs("--model.grpo.temperature", "1.0", "--model.grpo.logprob_temperature", "1.0")
        == "processed"
    )


def test_tina_recipes_use_raw_logits():
    if not TINY.exists():
        pytest.skip("data/tiny is not built")
    recipe = str(ROOT / "configs/tina/open_rs3.yaml")
    cpu = ["--model.model", str(TINY), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
           "--trainer.strategy", "auto", "--trainer.precision", "32-true", "--model.dtype", "float32"]  # fmt: skip
    cli = cli_main(["--config", recipe, *cpu], run=False)
    assert cli.model.grpo.logprob_temperature == 1.0 and cli.model.grpo.temperature == 0.7
    assert cli.model.grpo.logprob_temp == 1.0
    assert cli.config.rollout.vllm.engine_logprobs == "raw"


def _setup(engine_logprobs: str, logprob_temperature: float | None) -> None:
    from lightning_tina.callbacks import RolloutCallback
    from lightning_tina.rollout import VLLMConfig
    from lightning_tina.rollout.base import SamplingConfig

    callback = RolloutCallback(
        engine="hf",
        sampling=SamplingConfig(temperature=0.7),
        num_generations=4,
        vllm=VLLMConfig(engine_logprobs=engine_logprobs),
    )
    grpo = GRPOSettings(
        num_generations=4, batch_size=4, temperature=0.7, logprob_temperature=logprob_temperature
    )
    module = SimpleNamespace(grpo=grpo, rollout=None, connect_rollouts=lambda source: None)
    callback.setup(None, module, "fit")


def test_rollout_callback_refuses_engine_logprobs_of_another_kind():
    _setup("raw", 1.0)
    _setup("processed", None)
    with pytest.raises(ValueError, match="engine_logprobs='processed'.*logprob_temperature=1.0.*'raw'"):
        _setup("processed", 1.0)
    with pytest.raises(ValueError, match="engine_logprobs='raw'.*'processed'"):
        _setup("raw", None)
