"""The colocated vLLM engine: output layout, EOS, and proof that it samples from the policy just synced.

Freshness (issue 5.3): after every optimizer step and `sync`, vLLM's log-prob of each sampled token must match the
policy's own log_softmax(logits / T), recomputed with the PEFT model in eval mode. Tolerance (fp32 on both sides):
mean |diff| <= 1e-4 and max |diff| <= 1e-3. The two sides run different kernels (vLLM's CPU attention and punica
LoRA ops vs torch eager), so they agree to fp32 rounding accumulated through the network and scaled by 1/T.
Measured: mean below 4e-7 and max below 1.2e-5 on data/tiny (below 2.2e-7 / 1.5e-6 on the random stand-in; max
5e-5 with a larger random adapter, LoRA weights of std 0.3), so 80x or more below the tolerance. Skipping the sync
after one Adam step at lr 5e-3 leaves a mean gap of 0.1-0.9 on both models, so the stale check (mean gap > 10x
the tolerance) fails a stale adapter by a wide margin. The lr is kept low enough that the policy does not collapse
onto its samples (at lr 5e-2 data/tiny reached log-probs of exactly 0, where any engine would "match"); the test
also asserts that the sampled tokens are not near-certain.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: no spawned engine process
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from lightning_tina.rollout.base import SamplingConfig  # noqa: E402
from lightning_tina.rollout.vllm import (  # noqa: E402
    VLLM_INSTALL_HINT,
    VLLMConfig,
    VLLMEngine,
    vllm_available,
)
from lightning_tina.types import Generation  # noqa: E402

MEAN_TOL = 1e-4
MAX_TOL = 1e-3
TEMPERATURE = 0.7
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY_DIR = Path(__file__).resolve().parents[1] / "data" / "tiny"

requires_vllm = pytest.mark.skipif(not vllm_available(), reason=VLLM_INSTALL_HINT)


def _build_random_qwen2(out: Path) -> None:
    """A random Qwen2 (hidden 64, 2 layers, head_dim 32) with a small byte-level BPE tokenizer (288 tokens).

    EOS is made more likely (measured: 2.4% per token at T = 0.7, against 0.35% for a uniform pick) so that most
    64-token completions stop: embedding channel 0 is a constant 0.3 for every token, which after the final
    RMSNorm is a positive feature, and the EOS row of the output head reads it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["What is 12 + 34? The answer is 46. Think step by step."] * 8, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    cfg = Qwen2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        intermediate_size=128,
        vocab_size=len(fast),
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        initializer_range=0.05,
    )
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.3  # [V] constant channel
        model.lm_head.weight[fast.eos_token_id, 0] = 0.7  # EOS logit about +3.3 on every position
    model.save_pretrained(out)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped tiny model when data/tiny has one, else a random Qwen2 built in a temp folder."""
    if (TINY_DIR / "config.json").is_file() and (TINY_DIR / "tokenizer.json").is_file():
        return TINY_DIR
    out = tmp_path_factory.mktemp("tiny-qwen2")
    _build_random_qwen2(out)
    return out


def _prompts(path: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    texts = ["What is 12 + 34?", "What is 7 * 8?", "What is 90 - 45?"]
    if tok.chat_template:  # the shipped tiny model was trained on chat-formatted prompts
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
            )
            for t in texts
        ]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _engine(path: Path, **config: object) -> VLLMEngine:
    return VLLMEngine(
        str(path), dtype="float32", max_lora_rank=8, config=VLLMConfig(kv_cache_gib=0.25, **config)
    )


def _policy(path: Path) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS))


def _policy_logprobs(
    model: torch.nn.Module, prompts: list[list[int]], gens: list[Generation], n: int
) -> list:
    """log_softmax(logits / T) of each sampled token under `model`, one tensor per generation."""
    out = []
    for i, gen in enumerate(gens):
        prompt = prompts[i // n]
        ids = torch.tensor([prompt + gen.token_ids])  # [1, P+C]
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # [C, V]
        logp = torch.log_softmax(logits.float() / TEMPERATURE, dim=-1)  # [C, V]
        out.append(logp.gather(-1, torch.tensor(gen.token_ids)[:, None])[:, 0])  # [C]
    return out


def _gap(
    model: torch.nn.Module, prompts: list[list[int]], gens: list[Generation], n: int
) -> tuple[float, float]:
    """Mean and max |engine log-prob - policy log-prob| over all sampled tokens."""
    model.eval()
    with torch.no_grad():
        ours = torch.cat(_policy_logprobs(model, prompts, gens, n))  # [tokens]
    theirs = torch.tensor([lp for g in gens for lp in g.logprobs])  # [tokens]
    diff = (ours - theirs).abs()
    return diff.mean().item(), diff.max().item()


@pytest.mark.vllm
@requires_vllm
@pytest.mark.parametrize(
    "sync_mode, fast_path",
    [("files", True), ("tensors", True), ("tensors", False)],
    ids=["files", "tensors", "tensors-vllm-lora-ops"],
)
def test_freshness_with_and_without_sync(tiny_model: Path, sync_mode: str, fast_path: bool) -> None:
    """fast_path=False checks vLLM's own CPU LoRA ops; True checks our single-adapter matmul (vllm_worker.py)."""
    prompts, n = _prompts(tiny_model), 4
    sampling = SamplingConfig(max_new_tokens=12, temperature=TEMPERATURE)
    policy = _policy(tiny_model)
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=5e-3)
    engine = _engine(tiny_model, sync_mode=sync_mode, cpu_lora_fast_path=fast_path)
    try:
        engine.sync(policy, 0)
        gens = engine.generate(prompts, n, sampling)
        assert _gap(policy, prompts, gens, n)[0] <= MEAN_TOL
        for step in range(1, 4):
            # One optimizer step that makes the sampled tokens more likely (any loss that moves the policy).
            policy.train()
            loss = -torch.cat(_policy_logprobs(policy, prompts, gens, n)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

            stale = engine.generate(prompts, n, sampling)  # no sync: the engine still serves step-1 weights
            stale_mean, _ = _gap(policy, prompts, stale, n)
            assert stale_mean > 10 * MEAN_TOL, (
                f"step {step}: a stale adapter went unnoticed ({stale_mean:.2e})"
            )

            engine.sync(policy, step)
            gens = engine.generate(prompts, n, sampling)
            mean, worst = _gap(policy, prompts, gens, n)
            certainty = sum(-lp for g in gens for lp in g.logprobs) / sum(len(g.logprobs) for g in gens)
            assert certainty > 0.01, f"step {step}: the policy collapsed (mean -log-prob {certainty:.3f})"
            print(
                f"{sync_mode} fast={fast_path} step {step}: fresh mean {mean:.2e} max {worst:.2e}; "
                f"stale mean {stale_mean:.2e}; mean -log-prob {certainty:.3f}"
            )
            assert mean <= MEAN_TOL and worst <= MAX_TOL, f"step {step}: mean {mean:.2e}, max {worst:.2e}"
        engine.sync(policy, 4)
        engine.sync(policy, 5)  # supersedes a snapshot that was never served
        engine.generate(prompts[:1], 1, sampling)
        assert len(engine.served_adapter_ids()) == 1  # old versions released
        if sync_mode == "files":
            assert len(list(engine._adapter_root.iterdir())) == 1  # old adapter files deleted
    finally:
        engine.close()


@pytest.mark.vllm
@requires_vllm
def test_generate_layout_eos_and_logprobs(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    eos, prompts, n = tok.eos_token_id, _prompts(tiny_model), 4
    # long enough to reach EOS (configs/tiny.yaml samples at most 96 tokens)
    long = SamplingConfig(max_new_tokens=128, temperature=TEMPERATURE, seed=7)
    short = SamplingConfig(max_new_tokens=3, temperature=TEMPERATURE, seed=7)  # short enough to be cut
    engine = _engine(tiny_model)
    try:
        torch.manual_seed(5)
        set_num_threads = torch.set_num_threads
        gens = engine.generate(prompts, n, long)  # starts the engine; no sync yet: the base model
        # Starting vLLM in-process leaves the trainer's RNG stream and torch.set_num_threads untouched.
        assert torch.set_num_threads is set_num_threads
        after = torch.rand(4)
        torch.manual_seed(5)
        assert torch.equal(after, torch.rand(4))

        cut = engine.generate(prompts, n, short)
        for batch, sampling in ((gens, long), (cut, short)):
            assert len(batch) == len(prompts) * n
            for g in batch:
                assert len(g.logprobs) == len(g.token_ids) and all(lp <= 0.0 for lp in g.logprobs)
                if g.finish_reason == "stop":  # stopped at EOS, which is kept as the last token
                    assert g.token_ids[-1] == eos and eos not in g.token_ids[:-1]
                else:
                    assert g.finish_reason == "length" and eos not in g.token_ids
                    assert len(g.token_ids) == sampling.max_new_tokens
        assert "stop" in {g.finish_reason for g in gens} and "length" in {g.finish_reason for g in cut}
        assert _gap(_policy(tiny_model), prompts, gens, n)[1] <= MAX_TOL  # each group scored under its prompt

        again = engine.generate(prompts, n, long)
        assert [g.token_ids for g in again] == [g.token_ids for g in gens]  # a seed reproduces the sample
        assert len({tuple(g.token_ids) for g in gens[:n]}) > 1  # the n completions of a prompt differ
        # Group-major: prompt 1 alone (its seed is seed + 1 * n) gives exactly rows n .. 2n-1.
        alone = engine.generate(
            prompts[1:2], n, SamplingConfig(max_new_tokens=128, temperature=TEMPERATURE, seed=7 + n)
        )
        assert [g.token_ids for g in alone] == [g.token_ids for g in gens[n : 2 * n]]

        # A stop string ends completion j (seed 7 + j) where it first contains the string: take its 3rd token's
        # text (a printable one, so that no partial UTF-8 byte is involved).
        thirds = [tok.decode(g.token_ids[2:3]) if len(g.token_ids) > 3 else "" for g in gens[:n]]
        j = next(k for k, text in enumerate(thirds) if text.strip() and text.isascii())
        stop = thirds[j]
        first = gens[j].token_ids
        stop_sampling = SamplingConfig(max_new_tokens=64, temperature=TEMPERATURE, seed=7 + j, stop=[stop])
        stopped = engine.generate(prompts[:1], 1, stop_sampling)[0]
        assert stopped.finish_reason == "stop" and len(stopped.token_ids) <= 3
        assert stopped.token_ids == first[: len(stopped.token_ids)] and stop in tok.decode(stopped.token_ids)

        with pytest.raises(ValueError, match="max_model_len"):
            engine.generate([[1] * 600], 1, long)
    finally:
        engine.close()


@pytest.mark.vllm
@requires_vllm
def test_full_weight_sync_without_peft(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    prompts, n = _prompts(tiny_model), 2
    sampling = SamplingConfig(max_new_tokens=8, temperature=TEMPERATURE, seed=3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    engine = _engine(tiny_model)
    try:
        engine.sync(model, 0)
        assert _gap(model, prompts, engine.generate(prompts, n, sampling), n)[0] <= MEAN_TOL
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))  # a large "optimizer step" on every weight
        assert _gap(model, prompts, engine.generate(prompts, n, sampling), n)[0] > 10 * MEAN_TOL  # stale
        engine.sync(model, 1)
        mean, worst = _gap(model, prompts, engine.generate(prompts, n, sampling), n)
        assert mean <= MEAN_TOL and worst <= MAX_TOL
    finally:
        engine.close()


def test_bad_settings_and_adapters_are_refused(tiny_model: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="max_lora_rank"):
        VLLMEngine(str(tiny_model), max_lora_rank=1024)
    with pytest.raises(ValueError, match="dtype"):
        VLLMEngine(str(tiny_model), dtype="fp8")
    with pytest.raises(ValueError, match="sync_mode"):
        VLLMEngine(str(tiny_model), config=VLLMConfig(sync_mode="shm"))  # type: ignore[arg-type]
    assert VLLMEngine(str(tiny_model), max_lora_rank=20).max_lora_rank == 32  # rounded up to a vLLM rank
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="enable_sleep_mode"):
            VLLMEngine(str(tiny_model), config=VLLMConfig(enable_sleep_mode=True))
    engine = _engine(tiny_model)  # never started: the checks run before vLLM is touched
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    too_big = get_peft_model(base, LoraConfig(r=16, target_modules=LORA_TARGETS))
    with pytest.raises(ValueError, match="max_lora_rank 8"):
        engine.sync(too_big, 0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    dora = get_peft_model(base, LoraConfig(r=8, use_dora=True, target_modules=LORA_TARGETS))
    with pytest.raises(ValueError, match="use_dora"):
        engine.sync(dora, 0)
    assert engine._llm is None
    assert ".[cpu]" in VLLM_INSTALL_HINT and ".[gpu]" in VLLM_INSTALL_HINT
