"""The colocated vLLM engine serving a population: several named LoRA adapters of one PEFT model, one LoRARequest per
prompt in a single `generate` call (vLLM's multi-LoRA batching).

The fast tests check the settings and arguments without starting vLLM. The vLLM test (greedy: top_k=1, float32, data/tiny)
holds one population call with adapters [a, a, b, b] to Hugging Face greedy `generate` with `set_adapter(a)` /
`set_adapter(b)` and to a solo engine serving each adapter alone, token for token, and checks that after b changes
and `sync(policy, version + 1)` the next call serves the new b and the unchanged a. The two adapters differ in rank
(8 and 16) and target modules, and have random non-zero lora_B weights, so that each changes the greedy output.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: no spawned engine process
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from lightning_tina.rollout import make_engine  # noqa: E402
from lightning_tina.rollout.base import SamplingConfig  # noqa: E402
from lightning_tina.rollout.vllm import VLLM_INSTALL_HINT, VLLMConfig, VLLMEngine, vllm_available  # noqa: E402

requires_vllm = pytest.mark.skipif(not vllm_available(), reason=VLLM_INSTALL_HINT)

A, B = "lr_1e-3", "lr_3e-4"  # population-style names (letters, digits, "_", "-")
# Greedy with n = 2: vLLM refuses n > 1 at temperature 0, so sample from the top token only (top_k = 1).
GREEDY = SamplingConfig(max_new_tokens=24, temperature=1.0, top_k=1, seed=0)


def _population_engine(path: Path, adapters: tuple[str, ...] = (A, B), **config: object) -> VLLMEngine:
    return VLLMEngine(
        str(path),
        dtype="float32",
        max_lora_rank=16,
        config=VLLMConfig(kv_cache_gib=0.25, **config),
        adapters=adapters,
    )


def _randomize(policy: torch.nn.Module, adapter: str, seed: int, std: float = 0.3) -> None:
    """Non-zero lora_B weights (PEFT starts them at zero) for `adapter`, from `seed`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if f"lora_B.{adapter}." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _two_adapter_policy(path: Path) -> torch.nn.Module:
    """A PEFT model holding A (rank 8: q, v, gate) and B (rank 16: q, k, o, up, down), float32, random lora_B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # lora_A's initialisation
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg_a = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "gate_proj"])
    cfg_b = LoraConfig(
        r=16,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"],
    )
    policy = get_peft_model(base, cfg_a, adapter_name=A)
    policy.add_adapter(B, cfg_b)
    _randomize(policy, A, seed=1)
    _randomize(policy, B, seed=2)
    return policy.eval()


# ---- without vLLM ------------------------------------------------------------------------------------------------


def test_population_resolves_weight_sync_to_lora_and_refuses_merged(tiny_model: Path) -> None:
    pop = _population_engine(tiny_model)
    kwargs = pop.engine_kwargs()
    assert pop.weight_sync == "lora" and pop.adapters == (A, B)
    assert kwargs["enable_lora"] and kwargs["max_loras"] == kwargs["max_cpu_loras"] == 2
    assert kwargs["max_lora_rank"] == 16
    three = _population_engine(tiny_model, adapters=("x", "y", "z"), weight_sync="lora").engine_kwargs()
    assert three["max_loras"] == three["max_cpu_loras"] == 3
    with pytest.raises(ValueError, match=r"rollout\.vllm\.weight_sync='merged'.*weight_sync: lora"):
        _population_engine(tiny_model, weight_sync="merged")
    with pytest.raises(ValueError, match="distinct"):
        _population_engine(tiny_model, adapters=(A, A))
    # solo, and a population of one, resolve as before: "merged" on CPU, one LoRA slot with "lora"
    for adapters in ((), (A,)):
        auto = _population_engine(tiny_model, adapters=adapters)
        assert auto.weight_sync == ("lora" if torch.cuda.is_available() else "merged")
        lora = _population_engine(tiny_model, adapters=adapters, weight_sync="lora").engine_kwargs()
        assert lora["max_loras"] == lora["max_cpu_loras"] == 1
    engine = make_engine(
        "vllm", model_name=str(tiny_model), policy=None, tokenizer=None, lora_rank=16, adapters=(A, B)
    )
    assert isinstance(engine, VLLMEngine) and engine.adapters == (A, B) and engine.weight_sync == "lora"
    solo = make_engine("vllm", model_name=str(tiny_model), policy=None, tokenizer=None, lora_rank=16)
    assert solo.adapters == ()


def test_generate_refuses_adapters_that_do_not_fit(tiny_model: Path) -> None:
    """Every check runs before vLLM is touched."""
    prompts = [[1, 2], [3, 4]]
    pop = _population_engine(tiny_model)
    with pytest.raises(ValueError, match=r"serves the population \['lr_1e-3', 'lr_3e-4'\]; pass adapters"):
        pop.generate(prompts, 2, GREEDY)
    with pytest.raises(ValueError, match="2 prompts but adapters has 3"):
        pop.generate(prompts, 2, GREEDY, adapters=[A, B, B])
    with pytest.raises(ValueError, match="2 prompts but adapters has a single string"):
        pop.generate(prompts, 2, GREEDY, adapters=A)
    with pytest.raises(ValueError, match=r"unknown adapters \['default'\].*serves \['lr_1e-3', 'lr_3e-4'\]"):
        pop.generate(prompts, 2, GREEDY, adapters=[A, "default"])
    with pytest.raises(ValueError, match="solo run"):
        _population_engine(tiny_model, adapters=()).generate(prompts, 2, GREEDY, adapters=[A, A])
    one = _population_engine(tiny_model, adapters=(A,))
    with pytest.raises(ValueError, match="pass adapters"):
        one.generate(prompts, 2, GREEDY)
    assert pop.generate([], 2, GREEDY, adapters=[]) == []
    assert pop._llm is None and one._llm is None


@pytest.mark.parametrize("sync_mode", ["tensors", "files"])
def test_sync_snapshots_every_adapter_by_name(tiny_model: Path, sync_mode: str) -> None:
    from peft import get_peft_model_state_dict

    policy = _two_adapter_policy(tiny_model)
    policy.set_adapter(B)  # the active adapter does not matter to a population engine
    engine = _population_engine(tiny_model, sync_mode=sync_mode)
    try:
        engine.sync(policy, 0)
        kind, payload = engine._weights._pending
        assert kind == sync_mode and list(payload) == [A, B]
        for name in (A, B):
            want = get_peft_model_state_dict(policy, adapter_name=name)
            if sync_mode == "tensors":
                tensors, cfg = payload[name]
                assert cfg["r"] == policy.peft_config[name].r and set(cfg["target_modules"]) == set(
                    policy.peft_config[name].target_modules
                )
            else:
                from safetensors.torch import load_file

                tensors = load_file(str(Path(payload[name]) / "adapter_model.safetensors"))
                assert (Path(payload[name]) / "adapter_config.json").is_file()
            assert tensors.keys() == want.keys()
            for k, v in want.items():
                torch.testing.assert_close(tensors[k], v, rtol=0, atol=0, msg=k)
        if sync_mode == "files":
            first = list(payload.values())
            engine.sync(policy, 1)  # supersedes a snapshot that was never served: its folders are deleted
            assert not any(Path(p).exists() for p in first)
            assert sorted(engine._weights.adapter_root.iterdir()) == sorted(
                Path(p) for p in engine._weights._pending[1].values()
            )
    finally:
        engine.close()
    assert engine._llm is None


def test_sync_refuses_a_policy_that_does_not_hold_the_population(tiny_model: Path) -> None:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    policy = _two_adapter_policy(tiny_model)
    with pytest.raises(ValueError, match=r"no adapter named \['c'\]; it holds \['lr_1e-3', 'lr_3e-4'\]"):
        _population_engine(tiny_model, adapters=(A, "c")).sync(policy, 0)
    small = VLLMEngine(
        str(tiny_model),
        dtype="float32",
        max_lora_rank=8,
        config=VLLMConfig(kv_cache_gib=0.25),
        adapters=(A, B),
    )
    with pytest.raises(ValueError, match=r"adapter 'lr_3e-4'.*rank 16 > the engine's max_lora_rank 8"):
        small.sync(policy, 0)
    assert small._weights._pending is None
    policy.add_adapter("dora", LoraConfig(r=8, use_dora=True, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="'dora'.*use_dora"):
        _population_engine(tiny_model, adapters=(A, "dora")).sync(policy, 0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with pytest.raises(ValueError, match="not a PEFT model"):
        _population_engine(tiny_model).sync(base, 0)


def test_population_of_one_may_merge_its_named_adapter(tiny_model: Path) -> None:
    from lightning_tina.rollout.vllm_sync import merged_lora_weights

    policy = _two_adapter_policy(tiny_model)
    policy.set_adapter(A)  # active: A; the population of one names B
    engine = _population_engine(tiny_model, adapters=(B,), weight_sync="merged")
    engine.sync(policy, 0)
    kind, got = engine._weights._pending
    want = merged_lora_weights(policy, B, torch.float32)
    assert kind == "merged" and [k for k, _ in got] == [k for k, _ in want]
    for (name, a), (_, b) in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


# ---- with vLLM ---------------------------------------------------------------------------------------------------


@pytest.mark.vllm
@requires_vllm
def test_cpu_fast_path_matches_vllms_ops_on_mixed_adapters(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU LoRA fast path (rollout/vllm_worker.py) on a batch that mixes adapter slots (a population call):
    one matmul per adapter gives what vLLM's per-token gather gives, for every op and both `add` modes, prefill
    (sgmv) included; a token without an adapter (-1) is left to vLLM's op."""
    from vllm.lora.ops.torch_ops import lora_ops

    import lightning_tina.rollout.vllm_worker as worker

    monkeypatch.setitem(worker._FAST_PATH, "on", True)
    monkeypatch.setattr(worker, "_ORIGINAL", {n: getattr(lora_ops, n) for n in worker._FAST_OPS})
    g = torch.Generator().manual_seed(0)
    slots, rank, d_in, d_out, tokens = 3, 16, 24, 40, 7
    a = torch.randn(slots, 1, rank, d_in, generator=g)  # vLLM's stacked lora_a [slots, 1, r, in]
    b = torch.randn(slots, 1, d_out, rank, generator=g)  # stacked lora_b [slots, 1, out, r]
    x = torch.randn(tokens, d_in, generator=g)
    h = torch.randn(tokens, rank, generator=g)
    base = torch.randn(tokens, d_out + 8, generator=g)
    # (per-token adapter slots, matmuls of the fast path: None = vLLM's op)
    for idx, matmuls in (([2, 0, 0, 2, 1, 1, 0], 3), ([1] * tokens, 1), ([0, 0, -1, 1, 1, 1, 0], None)):
        idx = torch.tensor(idx)
        ours, ref = torch.zeros(tokens, rank), torch.zeros(tokens, rank)
        groups = worker._groups(idx, a, x, ours)
        assert (None if groups is None else len(groups)) == matmuls
        worker._bgmv_shrink(x, a, ours, idx, 0.5)
        lora_ops.bgmv_shrink(x, a, ref, idx, 0.5)
        torch.testing.assert_close(ours, ref)
        for add in (True, False):
            ours, ref = base.clone(), base.clone()
            worker._bgmv_expand(h, b, ours, idx, add)
            lora_ops.bgmv_expand(h, b, ref, idx, add)
            torch.testing.assert_close(ours, ref)
            ours, ref = base.clone(), base.clone()
            worker._bgmv_expand_slice(h, b, ours, idx, 4, d_out, add)
            lora_ops.bgmv_expand_slice(h, b, ref, idx, 4, d_out, add)
            torch.testing.assert_close(ours, ref)
    # prefill: one index per sequence (lengths 3, 4), exploded to the tokens
    seq_idx, lens = torch.tensor([2, 0]), torch.tensor([3, 4])
    starts = torch.tensor([0, 3])
    ours, ref = torch.zeros(tokens, rank), torch.zeros(tokens, rank)
    worker._FAST_OPS["sgmv_shrink"](x, a, ours, starts, lens, seq_idx, 2, 4, tokens, 0.5)
    lora_ops.sgmv_shrink(x, a, ref, starts, lens, seq_idx, 2, 4, tokens, 0.5)
    torch.testing.assert_close(ours, ref)
    ours, ref = base.clone(), base.clone()
    worker._FAST_OPS["sgmv_expand"](h, b, ours, starts, lens, seq_idx, 2, 4, tokens)
    lora_ops.sgmv_expand(h, b, ref, starts, lens, seq_idx, 2, 4, tokens)
    torch.testing.assert_close(ours, ref)


def _hf_greedy(policy: torch.nn.Module, adapter: str, prompts: list[list[int]], eos: int) -> list[list[int]]:
    """Hugging Face greedy completions of `prompts` through `adapter` (stopped at EOS, which is kept)."""
    policy.set_adapter(adapter)
    out = []
    with torch.no_grad():
        for ids in prompts:
            seq = policy.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=GREEDY.max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )[0, len(ids) :].tolist()
            out.append(seq[: seq.index(eos) + 1] if eos in seq else seq)
    return out


@pytest.mark.vllm
@requires_vllm
@pytest.mark.parametrize("sync_mode", ["tensors", "files"])
def test_one_call_serves_each_prompt_through_its_adapter(
    tiny_model: Path, tiny_prompts: list[list[int]], sync_mode: str
) -> None:
    import time

    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_model).eos_token_id
    p0, p1 = tiny_prompts[:2]
    prompts, adapters, n = [p0, p1, p0, p1], [A, A, B, B], 2
    policy = _two_adapter_policy(tiny_model)
    want = {name: _hf_greedy(policy, name, [p0, p1], eos) for name in (A, B)}
    assert want[A] != want[B], "the two adapters should sample differently (else the test proves nothing)"

    def rows(gens: list) -> list[list[int]]:
        """The token ids of each prompt (its n greedy completions must be equal)."""
        ids = [g.token_ids for g in gens]
        groups = [ids[i : i + n] for i in range(0, len(ids), n)]
        assert all(g == [g[0]] * n for g in groups)
        return [g[0] for g in groups]

    engine = _population_engine(tiny_model, sync_mode=sync_mode)
    try:
        policy.set_adapter(B)  # the engine syncs both adapters by name, whatever is active
        engine.sync(policy, 0)
        t0 = time.perf_counter()
        got = rows(engine.generate(prompts, n, GREEDY, adapters=adapters))
        first = time.perf_counter() - t0
        assert got == want[A] + want[B]
        served = engine.served_adapter_ids()
        assert len(served) == 2

        # adapter B takes an "optimizer step"; A does not
        _randomize(policy, B, seed=3)
        new_b = _hf_greedy(policy, B, [p0, p1], eos)
        assert new_b != want[B]
        engine.sync(policy, 1)
        t0 = time.perf_counter()
        got = rows(engine.generate(prompts, n, GREEDY, adapters=adapters))
        second = time.perf_counter() - t0
        assert got == want[A] + new_b
        assert len(engine.served_adapter_ids()) == 2 and not engine.served_adapter_ids() & served  # fresh ids
        if sync_mode == "files":
            assert len(list(engine._weights.adapter_root.iterdir())) == 2  # the old adapters' files deleted
        # one adapter per call still works (every prompt through B) and is the same sample
        assert rows(engine.generate([p0, p1], n, GREEDY, adapters=[B, B])) == new_b
        print(f"{sync_mode}: population call {first:.2f} s (incl. start), after sync {second:.2f} s")
    finally:
        engine.close()

    if sync_mode == "tensors":  # vLLM serving each adapter alone (a solo engine, the active adapter)
        solo = VLLMEngine(
            str(tiny_model),
            dtype="float32",
            max_lora_rank=16,
            config=VLLMConfig(kv_cache_gib=0.25, weight_sync="lora"),
        )
        try:
            for version, (name, expected) in enumerate(((A, want[A]), (B, new_b))):
                policy.set_adapter(name)
                solo.sync(policy, version)
                assert rows(solo.generate([p0, p1], n, GREEDY)) == expected, name
        finally:
            solo.close()
