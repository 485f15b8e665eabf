"""Rollout engines: the colocated vLLM engine's output layout, EOS, and proof that it samples from the policy just
synced (adapter served as a LoRA or merged into the weights). The HF engine's tests are in test_hf_engine.py; the
`tiny_model` and `tiny_prompts` fixtures in conftest.py.

Freshness (issue 5.3): after every optimizer step and `sync`, vLLM's log-prob of each sampled token must match the
policy's own log_softmax(logits / T), recomputed with the PEFT model in eval mode. Tolerance (fp32 on both sides):
mean |diff| <= 1e-4 and max |diff| <= 1e-3. The two sides run different kernels (vLLM's CPU attention and punica
LoRA ops vs torch eager), so they agree to fp32 rounding accumulated through the network and scaled by 1/T.
Measured: mean below 4e-7 and max below 1.2e-5 on data/tiny (below 2.2e-7 / 1.5e-6 on the random stand-in; max
5e-5 with a larger random adapter, LoRA weights of std 0.3), so 80x or more below the tolerance. Skipping the sync
after one Adam step at lr 5e-3 leaves a mean gap of 0.1-0.9 on both models, so the stale check (mean gap > 10x
the tolerance) fails a stale adapter by a wide margin. The lr is kept low enough that the policy does not collapse
onto its samples (at lr 5e-2 data/tiny reached log-probs of exactly 0, where any engine would "match"); the test
also asserts that the sampled tokens are not near-certain. Merged sync (weight_sync="merged", the adapter merged into
the linear weights and loaded in place) is held to the same tolerances (measured: mean 1.8e-6, max 3e-5 with a
large random adapter on data/tiny).
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: no spawned engine process
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from lightning_tina.policy import TINA_TARGET_MODULES  # noqa: E402
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
LORA_TARGETS = TINA_TARGET_MODULES

requires_vllm = pytest.mark.skipif(not vllm_available(), reason=VLLM_INSTALL_HINT)


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
    "weight_sync, sync_mode, fast_path",
    [
        ("lora", "files", True),
        ("lora", "tensors", True),
        ("lora", "tensors", False),
        ("merged", "auto", True),
    ],
    ids=["files", "tensors", "tensors-vllm-lora-ops", "merged"],
)
def test_freshness_with_and_without_sync(
    tiny_model: Path, tiny_prompts: list[list[int]], weight_sync: str, sync_mode: str, fast_path: bool
) -> None:
    """fast_path=False checks vLLM's own CPU LoRA ops; True checks our single-adapter matmul (vllm_worker.py);
    "merged" serves the adapter merged into full weights by an engine without LoRA."""
    prompts, n = tiny_prompts, 4
    sampling = SamplingConfig(max_new_tokens=12, temperature=TEMPERATURE)
    policy = _policy(tiny_model)
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=5e-3)
    engine = _engine(tiny_model, weight_sync=weight_sync, sync_mode=sync_mode, cpu_lora_fast_path=fast_path)
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
                f"{weight_sync} {sync_mode} fast={fast_path} step {step}: fresh mean {mean:.2e} max {worst:.2e}; "
                f"stale mean {stale_mean:.2e}; mean -log-prob {certainty:.3f}"
            )
            assert mean <= MEAN_TOL and worst <= MAX_TOL, f"step {step}: mean {mean:.2e}, max {worst:.2e}"
        engine.sync(policy, 4)
        engine.sync(policy, 5)  # supersedes a snapshot that was never served
        engine.generate(prompts[:1], 1, sampling)
        if weight_sync == "merged":
            assert "enable_lora" not in engine.engine_kwargs() and not engine.served_adapter_ids()
        else:
            assert len(engine.served_adapter_ids()) == 1  # old versions released
        if sync_mode == "files":
            assert len(list(engine._weights.adapter_root.iterdir())) == 1  # old adapter files deleted
    finally:
        engine.close()


@pytest.mark.vllm
@requires_vllm
def test_generate_layout_eos_and_logprobs(tiny_model: Path, tiny_prompts: list[list[int]]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    eos, prompts, n = tok.eos_token_id, tiny_prompts, 4
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

        # min_new_tokens: EOS is suppressed for that many tokens. M is one more than the shortest completion that
        # stopped above, so with the same seeds at least one completion must behave differently.
        m = min(len(g.token_ids) for g in gens if g.finish_reason == "stop") + 1
        forced = engine.generate(
            prompts, n, SamplingConfig(max_new_tokens=128, temperature=TEMPERATURE, seed=7, min_new_tokens=m)
        )
        assert all(len(g.token_ids) >= m and eos not in g.token_ids[:m] for g in forced)
        with pytest.raises(ValueError, match="min_new_tokens"):
            engine.generate(prompts, n, SamplingConfig(max_new_tokens=4, min_new_tokens=5))

        with pytest.raises(ValueError, match="max_model_len"):
            engine.generate([[1] * 600], 1, long)
    finally:
        engine.close()


@pytest.mark.vllm
@requires_vllm
def test_full_weight_sync_without_peft(tiny_model: Path, tiny_prompts: list[list[int]]) -> None:
    from transformers import AutoModelForCausalLM

    prompts, n = tiny_prompts, 2
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


@pytest.mark.vllm
@requires_vllm
def test_weight_reload_resets_the_prefix_cache(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts longer than a KV block get their first block from the prefix cache; after a merged (in-place) sync
    that block must be recomputed. Proof that the check can fail: with the reset disabled the gap is large."""
    n = 2
    sampling = SamplingConfig(max_new_tokens=8, temperature=TEMPERATURE, seed=11)
    policy = _policy(tiny_model)
    engine = _engine(tiny_model, weight_sync="merged")
    lora = [p for name, p in policy.named_parameters() if "lora_B" in name]

    def step(version: int) -> None:
        with torch.no_grad():
            for p in lora:
                p.add_(0.05 * torch.randn_like(p))  # a large "optimizer step" on the adapter
        engine.sync(policy, version)

    try:
        engine.sync(policy, 0)
        engine.generate([[1]], 1, sampling)  # starts the engine
        block = engine._llm.llm_engine.vllm_config.cache_config.block_size
        vocab = policy.config.vocab_size
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, vocab - 1, (2, block + 8), generator=g).tolist()  # one full block + 8
        engine.generate(prompts, n, sampling)  # caches each prompt's first block
        step(1)
        mean, worst = _gap(policy, prompts, engine.generate(prompts, n, sampling), n)
        assert mean <= MEAN_TOL and worst <= MAX_TOL, f"fresh: mean {mean:.2e}, max {worst:.2e}"

        monkeypatch.setattr(engine._llm, "reset_prefix_cache", lambda *a, **k: True)  # a reload that forgets
        step(2)
        stale, _ = _gap(policy, prompts, engine.generate(prompts, n, sampling), n)
        print(f"prefix cache: fresh mean {mean:.2e} max {worst:.2e}; without the reset {stale:.2e}")
        assert stale > 10 * MEAN_TOL, f"stale KV blocks went unnoticed ({stale:.2e})"
    finally:
        engine.close()


@pytest.mark.vllm
@requires_vllm
def test_compiled_cpu_rms_norm_matches_native() -> None:
    """The compiled kernels behind VLLMConfig.cpu_compiled_norm against vLLM's native RMSNorm and float64."""
    from vllm import ir

    from lightning_tina.rollout.vllm_worker import CPU_NORM_PROVIDER, install_cpu_rms_norm

    priority = install_cpu_rms_norm()
    assert priority == {
        "rms_norm": [CPU_NORM_PROVIDER, "native"],
        "fused_add_rms_norm": [CPU_NORM_PROVIDER, "native"],
    }
    assert install_cpu_rms_norm() == priority  # a second call registers nothing twice
    norm, add_norm = ir.ops.rms_norm, ir.ops.fused_add_rms_norm
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 2**-7)):
        x = (3 * torch.randn(37, 96, generator=g)).to(dtype)  # [T, H]
        res = torch.randn(37, 96, generator=g).to(dtype)  # [T, H]
        w = torch.randn(96, generator=g).to(dtype)  # [H]
        ours = norm.impls[CPU_NORM_PROVIDER].impl_fn(x, w, 1e-6)  # [T, H]
        native = norm.impls["native"].impl_fn(x, w, 1e-6)  # [T, H]
        x64 = x.double()
        exact = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()  # [T, H]
        scale = exact.abs().clamp(min=1.0)
        assert ours.dtype == dtype and ((ours.double() - exact).abs() / scale).max() <= tol
        assert ((ours.double() - native.double()).abs() / scale).max() <= 2 * tol
        a, r = x.clone(), res.clone()
        out, summed = add_norm.impls[CPU_NORM_PROVIDER].impl_fn(a, r, w, 1e-6)
        n_out, n_sum = add_norm.impls["native"].impl_fn(x.clone(), res.clone(), w, 1e-6)
        assert out.data_ptr() == a.data_ptr() and summed.data_ptr() == r.data_ptr()  # in place, as registered
        assert torch.equal(summed, n_sum)  # the residual stream: x + res, rounded once to the dtype
        assert ((out.double() - n_out.double()).abs() / scale).max() <= 2 * tol
    # Inputs the kernels do not take go to native: a weight of another dtype, a strided input.
    x = torch.randn(4, 96)
    assert norm.impls[CPU_NORM_PROVIDER].supports_args(x, torch.ones(96), 1e-6)
    assert not norm.impls[CPU_NORM_PROVIDER].supports_args(x, torch.ones(96, dtype=torch.bfloat16), 1e-6)
    assert not norm.impls[CPU_NORM_PROVIDER].supports_args(torch.randn(96, 4).T, torch.ones(96), 1e-6)


@pytest.mark.vllm
@requires_vllm
def test_engine_runs_rms_norm_compiled_unless_turned_off(
    tiny_model: Path, tiny_prompts: list[list[int]]
) -> None:
    """The engine hands vLLM the priority that puts the compiled RMSNorm first; with cpu_compiled_norm=False it
    runs vLLM's native one; both sample the same tokens with log-probs equal to float32 rounding."""
    from vllm import ir

    from lightning_tina.rollout.vllm_worker import CPU_NORM_PROVIDER

    sampling = SamplingConfig(max_new_tokens=12, temperature=TEMPERATURE, seed=3)
    x, w = torch.randn(5, 64), torch.ones(64)
    runs = {}
    for compiled in (True, False):
        engine = _engine(tiny_model, weight_sync="merged", cpu_compiled_norm=compiled)
        try:
            assert ("kernel_config" in engine.engine_kwargs()) == compiled
            runs[compiled] = engine.generate(tiny_prompts, 2, sampling)
            first = ir.ops.rms_norm.get_priority()[0]
            assert first == (CPU_NORM_PROVIDER if compiled else "native"), ir.ops.rms_norm.get_priority()
            assert ir.ops.rms_norm.dispatch(x, w, 1e-6).provider == first
        finally:
            engine.close()
    assert [g.token_ids for g in runs[True]] == [g.token_ids for g in runs[False]]
    a = torch.tensor([lp for g in runs[True] for lp in g.logprobs])
    b = torch.tensor([lp for g in runs[False] for lp in g.logprobs])
    assert (a - b).abs().max() <= 1e-4, (a - b).abs().max()


@pytest.mark.vllm
@requires_vllm
def test_bfloat16_rollouts_for_a_float32_trainer(tiny_model: Path, tiny_prompts: list[list[int]]) -> None:
    """VLLMConfig.dtype overrides the trainer's dtype; the log-prob gap is then bf16 rounding, not a stale model."""
    prompts, n = tiny_prompts, 4
    sampling = SamplingConfig(max_new_tokens=12, temperature=TEMPERATURE, seed=5)
    policy = _policy(tiny_model)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    engine = _engine(tiny_model, weight_sync="merged", dtype="bfloat16")
    try:
        assert engine.dtype == "bfloat16" and engine.engine_kwargs()["dtype"] == "bfloat16"
        engine.sync(policy, 0)
        gens = engine.generate(prompts, n, sampling)
        assert engine._llm.llm_engine.model_config.dtype == torch.bfloat16
        mean, worst = _gap(policy, prompts, gens, n)
        print(f"bf16 rollouts vs fp32 trainer: mean {mean:.2e} max {worst:.2e}")
        assert mean <= 0.05, f"bf16 engine is not serving the synced policy (mean gap {mean:.2e})"
    finally:
        engine.close()


def test_merged_weights_match_peft_merge_and_leave_the_policy_alone(tiny_model: Path) -> None:
    """The merged snapshot equals PEFT's merge_and_unload on a copy, for every pushed tensor; the policy's own
    weights do not change; every linear of a block with a LoRA target is sent (fused q/k/v and gate/up must
    arrive whole), and nothing else."""
    import copy

    from lightning_tina.rollout.vllm_sync import merged_lora_weights

    policy = _policy(tiny_model)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    pushed = dict(merged_lora_weights(policy, "default", torch.float32))
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in before.items())  # the policy is untouched
    reference = copy.deepcopy(policy).merge_and_unload().state_dict()
    linears = {k for k in reference if any(f".{t}." in k for t in LORA_TARGETS)}
    assert set(pushed) == linears  # all 7 linears of every layer, weights and biases
    for k, v in pushed.items():
        torch.testing.assert_close(v, reference[k], rtol=1e-6, atol=1e-6)
        if k.endswith(".weight"):
            original = before["base_model.model." + k.replace(".weight", ".base_layer.weight")]
            assert not torch.equal(v, original)  # the adapter was merged in

    # Only q_proj targeted: k/v ride along (fused with q), o_proj of the same block too; no MLP weights.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    q_only = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    names = {k.rsplit(".", 2)[-2] for k, _ in merged_lora_weights(q_only, "default", torch.bfloat16)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert all(v.dtype == torch.bfloat16 for _, v in merged_lora_weights(q_only, "default", torch.bfloat16))


def test_bad_settings_and_adapters_are_refused(tiny_model: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="max_lora_rank"):
        VLLMEngine(str(tiny_model), max_lora_rank=1024)
    with pytest.raises(ValueError, match="dtype"):
        VLLMEngine(str(tiny_model), dtype="fp8")
    # every setting is checked where it is defined (VLLMConfig.__post_init__), one error per field
    bad = {
        "gpu_memory_utilization": 1.5,
        "max_model_len": 0,
        "tensor_parallel_size": 0,
        "kv_cache_gib": 0.0,
        "max_num_seqs": 0,
        "max_num_batched_tokens": 0,
        "sync_mode": "shm",
        "weight_sync": "shared",
        "engine_logprobs": "sampled",
        "model_runner": "v3",
        "max_logprob_diff": -1.0,
        "dtype": "fp8",
    }
    for key, value in bad.items():
        with pytest.raises(ValueError, match=rf"^rollout\.vllm\.{key}="):
            VLLMConfig(**{key: value})
    with pytest.raises(
        ValueError, match="rollout.vllm.weight_sync='merged': 'merged' needs tensor_parallel_size=1"
    ):
        VLLMConfig(weight_sync="merged", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="rollout.vllm.sync_mode='tensors'"):
        VLLMConfig(sync_mode="tensors", tensor_parallel_size=2)
    override = VLLMEngine(str(tiny_model), dtype="float32", config=VLLMConfig(dtype="bfloat16"))
    assert override.dtype == "bfloat16" and VLLMEngine(str(tiny_model), dtype="float32").dtype == "float32"
    auto = VLLMEngine(str(tiny_model))
    assert auto.weight_sync == ("lora" if torch.cuda.is_available() else "merged")
    assert ("enable_lora" in auto.engine_kwargs()) == (auto.weight_sync == "lora")
    assert VLLMEngine(str(tiny_model), max_lora_rank=20).max_lora_rank == 32  # rounded up to a vLLM rank
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="enable_sleep_mode"):
            VLLMEngine(str(tiny_model), config=VLLMConfig(enable_sleep_mode=True))
        assert VLLMEngine(str(tiny_model)).launcher_env() == {}  # CPU: vLLM's own single-process executor
    engine = _engine(tiny_model, weight_sync="lora")  # never started: the checks run before vLLM is touched
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    too_big = get_peft_model(base, LoraConfig(r=16, target_modules=LORA_TARGETS))
    with pytest.raises(ValueError, match="max_lora_rank 8"):
        engine.sync(too_big, 0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    dora = get_peft_model(base, LoraConfig(r=8, use_dora=True, target_modules=LORA_TARGETS))
    with pytest.raises(ValueError, match="use_dora"):
        engine.sync(dora, 0)
    assert engine._llm is None
    merged = _engine(tiny_model, weight_sync="merged")  # merged: any rank works, DoRA still cannot be merged
    merged.sync(too_big, 0)
    with pytest.raises(ValueError, match="use_dora"):
        merged.sync(dora, 0)
    assert merged._llm is None
    assert ".[cpu]" in VLLM_INSTALL_HINT and ".[gpu]" in VLLM_INSTALL_HINT


# ---- issue 17: what the engine is given on a GPU machine, faked on CPU --------------------------------------------

import types  # noqa: E402


class _FakeLLM:
    """Stands in for vllm.LLM: records what it is started with, and does what vLLM's in-process start does to the
    process (selects GPU 0 as the current device, drops torch to one thread)."""

    starts: list[dict] = []

    def __init__(self, **kwargs: object) -> None:
        keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_USE_V2_MODEL_RUNNER")
        _FakeLLM.starts.append(
            dict(
                kwargs=kwargs,
                env={k: os.environ.get(k) for k in keys},
                autocast=torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"),
                device=torch.cuda.current_device(),
            )
        )
        torch.cuda.set_device(0)
        torch.set_num_threads(1)
        self.calls: list[tuple] = []
        self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=4096))

    def generate(
        self, prompts: list, params: list, lora_request: object = None, use_tqdm: bool = False
    ) -> list:
        self.calls.append(("generate", torch.is_autocast_enabled("cpu"), torch.get_num_threads()))
        comp = types.SimpleNamespace(
            index=0, token_ids=[5, 6], logprobs=[{5: _LP}, {6: _LP}], finish_reason="stop"
        )
        return [types.SimpleNamespace(outputs=[comp]) for _ in prompts]

    def sleep(self, level: int) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self) -> None:
        self.calls.append(("wake_up",))


_LP = types.SimpleNamespace(logprob=-0.5)


class _FakeCuda:
    """torch.cuda's device state on a machine without CUDA."""

    def __init__(self, device: int) -> None:
        self.device = device

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.device)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: setattr(self, "device", int(d)))
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)


def _fake_gpu_engine(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path, rank: int, world: int, device: int, **config: object
) -> tuple[VLLMEngine, _FakeCuda]:
    import sys

    import lightning_tina.rollout.vllm as vllm_module

    cuda = _FakeCuda(device)
    cuda.install(monkeypatch)
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: world > 1)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(vllm_module, "vllm_available", lambda: True)
    fake = types.SimpleNamespace(LLM=_FakeLLM, SamplingParams=lambda **k: k)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", types.SimpleNamespace(TokensPrompt=lambda **k: k))
    engine = VLLMEngine(str(tiny_model), dtype="bfloat16", config=VLLMConfig(**config))
    assert engine.on_gpu and engine.sleep_mode and engine.weight_sync == "lora"
    return engine, cuda


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_starts_its_engine_on_its_own_gpu_with_autocast_off(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, rank: int
) -> None:
    """Two fake DDP ranks (rank r on cuda:r, as Lightning sets the current device): each engine gets vLLM's
    external_launcher executor with the rank's RANK / LOCAL_RANK / WORLD_SIZE, is built with autocast off although
    the caller is under bf16 autocast, and the trainer's current device, threads and environment are as before."""
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    _FakeLLM.starts.clear()
    engine, cuda = _fake_gpu_engine(
        monkeypatch, tiny_model, rank=rank, world=2, device=rank, model_runner="v1"
    )
    before, threads = torch.get_num_threads(), 2  # the trainer's threads (vLLM drops them to 1)
    torch.set_num_threads(threads)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            engine._engine(num_seqs=6 * 4)  # the rank's first call: 6 prompts x G=4
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    (start,) = _FakeLLM.starts
    kwargs, env = start["kwargs"], start["env"]
    assert kwargs["distributed_executor_backend"] == "external_launcher"
    assert env["RANK"] == str(rank) and env["LOCAL_RANK"] == str(rank) and env["WORLD_SIZE"] == "2"
    assert env["MASTER_PORT"] is None  # the trainer's process group exists: vLLM joins it, no new rendezvous
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0"  # model_runner: v1, the documented fallback
    assert start["device"] == rank and start["autocast"] is False
    assert kwargs["max_num_seqs"] == 24 and kwargs["enable_sleep_mode"] is True
    assert kwargs["gpu_memory_utilization"] == 0.4 and kwargs["enable_lora"] is True
    # afterwards: the trainer's device (vLLM's start moved it to 0), threads and environment
    assert cuda.device == rank and after == threads
    assert all(k not in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "VLLM_USE_V2_MODEL_RUNNER"))
    assert engine._engine_threads == 1  # the engine's calls run with the threads vLLM chose


def test_single_process_gpu_engine_gets_its_own_rendezvous_and_tp_is_refused_with_ranks(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MASTER_PORT", raising=False)
    engine, _ = _fake_gpu_engine(monkeypatch, tiny_model, rank=0, world=1, device=3)  # trainer.devices: [3]
    env = engine.launcher_env()
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["LOCAL_RANK"] == "3"
    assert env["MASTER_ADDR"] and int(env["MASTER_PORT"]) > 0
    assert "VLLM_USE_V2_MODEL_RUNNER" not in engine.engine_environment()  # model_runner auto: vLLM's choice
    tp, _ = _fake_gpu_engine(monkeypatch, tiny_model, rank=1, world=2, device=1, tensor_parallel_size=2)
    assert tp.launcher_env() == {}
    with pytest.raises(ValueError, match="rollout.vllm.tensor_parallel_size=2 with 2 training ranks"):
        tp.engine_kwargs()


def test_max_num_seqs_follows_the_ranks_completions() -> None:
    from lightning_tina.rollout.vllm import default_max_num_seqs

    assert [default_max_num_seqs(n) for n in (1, 16, 24, 30, 1000, None)] == [8, 16, 24, 32, 256, 256]


def test_wake_up_empties_the_cache_first_and_turns_a_cumem_failure_into_oom_advice(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning_tina.rollout.vllm as vllm_module

    engine, _ = _fake_gpu_engine(monkeypatch, tiny_model, rank=0, world=1, device=0)
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    memory = {"free_gib": 10.0, "total_gib": 44.9, "allocated_gib": 5.0, "reserved_gib": 5.5}
    monkeypatch.setattr(vllm_module, "_gpu_memory", lambda: dict(memory))

    class Sleeper:
        def __init__(self, error: Exception | None) -> None:
            self.error = error

        def wake_up(self) -> None:
            calls.append("wake_up")
            if self.error is not None:
                raise self.error

    engine._llm, engine._asleep = Sleeper(None), True
    engine._wake()
    assert calls == ["empty_cache", "wake_up"] and not engine._asleep and engine.wake_memory == [memory]
    cumem = RuntimeError("CUDA Error: out of memory at /workspace/csrc/cumem_allocator.cpp:62")
    engine._llm, engine._asleep = Sleeper(cumem), True
    with pytest.raises(torch.OutOfMemoryError, match="rollout.vllm.gpu_memory_utilization") as info:
        engine._wake()
    assert "10.0 GiB of 44.9 GiB were free" in str(info.value) and info.value.__cause__ is cumem
    other = RuntimeError("CUDA Error: invalid argument")
    engine._llm, engine._asleep = Sleeper(other), True
    with pytest.raises(RuntimeError, match="invalid argument"):  # not a memory problem: as vLLM raised it
        engine._wake()


def test_logprob_drift_fails_loudly_on_gpu_only() -> None:
    from lightning_tina.rollout.vllm import check_logprob_drift

    limit = VLLMConfig().max_logprob_diff
    assert limit == 0.1
    check_logprob_drift(0.03, limit)  # bf16 kernels on both sides: fine
    check_logprob_drift(0.5, None)  # the check turned off
    check_logprob_drift(0.5, limit, on_gpu=False)  # CPU: the tests hold it to 1e-4 instead
    with pytest.raises(RuntimeError, match="rollout.vllm.max_logprob_diff=0.1.*model_runner: v1"):
        check_logprob_drift(0.5, limit)  # a fake mismatch: a stale adapter or another runner
    with pytest.raises(RuntimeError, match="drifted"):
        check_logprob_drift(float("nan"), limit)


def test_in_memory_adapter_refuses_a_vllm_without_the_private_fields() -> None:
    import types

    from lightning_tina.rollout.vllm_worker import add_lora_from_tensors

    worker = types.SimpleNamespace(model_runner=types.SimpleNamespace())  # no lora_manager
    with pytest.raises(RuntimeError, match="rollout.vllm.sync_mode: files"):
        add_lora_from_tensors(worker, 1, {}, {})


@pytest.mark.vllm
@requires_vllm
def test_float32_engine_under_bf16_autocast_computes_in_float32(
    tiny_model: Path, tiny_prompts: list[list[int]]
) -> None:
    """Lightning's bf16-mixed runs training_step under autocast, where the engine starts and generates: the float32
    CPU engine's log-probs still match the float32 policy to float32 rounding. (vLLM's CPU kernels ignore autocast,
    so this holds on CPU even without turning it off; on CUDA its linear layers would run in bf16. The autocast
    state inside the engine's calls is checked by the fake-GPU tests above.)"""
    prompts, n = tiny_prompts, 4
    policy = _policy(tiny_model)
    engine = _engine(tiny_model, weight_sync="lora", sync_mode="tensors")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            engine.sync(policy, 0)
            gens = engine.generate(prompts, n, SamplingConfig(max_new_tokens=12, temperature=TEMPERATURE))
            assert torch.is_autocast_enabled("cpu")  # the caller's context is back
        mean, worst = _gap(policy, prompts, gens, n)
        assert mean <= MEAN_TOL and worst <= MAX_TOL, (mean, worst)
    finally:
        engine.close()


def test_merged_snapshot_is_float32_even_under_bf16_autocast(tiny_model: Path) -> None:
    """sync runs inside training_step, i.e. under Lightning's autocast: the merge W + s * B @ A must still be
    computed in float32."""
    from lightning_tina.rollout.vllm_sync import merged_lora_weights

    policy = _policy(tiny_model)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    engine = _engine(tiny_model, weight_sync="merged")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        engine.sync(policy, 0)
    kind, got = engine._weights._pending
    want = merged_lora_weights(policy, "default", torch.float32)
    assert kind == "merged" and [k for k, _ in got] == [k for k, _ in want]
    for (name, a), (_, b) in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_a_fake_gpu_step_cycle_runs_the_engine_without_autocast_and_empties_the_cache_before_waking(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two rollouts on a fake GPU engine under the trainer's bf16 autocast: generate runs with autocast off and the
    engine's thread count, the engine sleeps after each rollout, and the trainer's cache is emptied before it wakes;
    the caller's autocast, threads and device are back afterwards."""
    import lightning_tina.rollout.vllm as vllm_module

    _FakeLLM.starts.clear()
    engine, cuda = _fake_gpu_engine(monkeypatch, tiny_model, rank=1, world=2, device=1)
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))
    monkeypatch.setattr(vllm_module, "_gpu_memory", lambda: {"free_gib": 30.0})
    before, threads = torch.get_num_threads(), 2  # the trainer's threads (vLLM drops them to 1)
    torch.set_num_threads(threads)
    sampling = SamplingConfig(max_new_tokens=2, temperature=0.7)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            gens = engine.generate([[1, 2, 3], [4, 5]], 1, sampling)
            events.append(f"training with {torch.get_num_threads()} threads")
            engine.generate([[1, 2, 3]], 1, sampling)
            assert torch.is_autocast_enabled("cpu")
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    llm = engine._llm
    assert [g.token_ids for g in gens] == [[5, 6], [5, 6]] and gens[0].logprobs == [-0.5, -0.5]
    assert llm.calls == [
        ("generate", False, 1),
        ("sleep", 1),
        ("wake_up",),
        ("generate", False, 1),
        ("sleep", 1),
    ]
    assert events == [
        "empty_cache",
        "training with 2 threads",
        "empty_cache",
    ]  # at the start, before the wake-up
    assert engine.wake_memory == [{"free_gib": 30.0}]
    assert after == threads and cuda.device == 1
    assert engine.max_num_seqs == 8  # 2 prompts x 1 completion, rounded up to 8
