"""Rollout throughput: the colocated vLLM engine against plain Hugging Face `generate`, and the adapter sync time.

Both engines sample P prompts x n completions of exactly T new tokens (EOS ignored) from the same PEFT LoRA policy
(adapter not merged) and report completion tokens per second, the median over repeats after one warm-up. The sync
time is `VLLMEngine.sync` (snapshot of the adapter) plus loading it into vLLM, for each sync mode.

    python bench/rollout_throughput.py                         # data/tiny if present, else a random tiny Qwen2
    python bench/rollout_throughput.py --config-from qwen1.5b  # 1.5B-shaped random Qwen2 (for a GPU)

Prints a short table and one JSON line (prefixed "JSON ").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # colocated: engine core in this process

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_tina.rollout.base import SamplingConfig  # noqa: E402
from lightning_tina.rollout.vllm import VLLMConfig, VLLMEngine  # noqa: E402

TINY_DIR = Path(__file__).resolve().parents[1] / "data" / "tiny"
# Random-weight shapes. tiny: the shape of the shipped data/tiny model (lightning_tina/tiny/build.py defaults);
# qwen1.5b: DeepSeek-R1-Distill-Qwen-1.5B's published config.json values.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=384,
        vocab_size=264,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
    "qwen1.5b": dict(
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        max_position_embeddings=131072,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_random_qwen2(preset: str, out: Path, dtype: torch.dtype) -> None:
    """Save a random-weight Qwen2 of the given shape and a word-level tokenizer covering its whole vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    shape = PRESETS[preset]
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = shape["vocab_size"] - 1
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{eos}", pad_token="t0").save_pretrained(out)
    config = Qwen2Config(**shape, eos_token_id=eos, pad_token_id=0)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.save_pretrained(out)


def lora_policy(model_path: str, rank: int, dtype: torch.dtype) -> torch.nn.Module:
    """The base model wrapped in a LoRA whose B matrices are random (so the adapter changes the outputs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    policy = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01)
    return policy.eval()


def timed(fn, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of fn()."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def bench_hf(
    policy: torch.nn.Module, prompts: list[list[int]], n: int, tokens: int, repeats: int
) -> list[float]:
    """Tokens/s of model.generate(do_sample, num_return_sequences=n), all prompts in one batch."""
    ids = torch.tensor(prompts, device=policy.device)  # [P, L] (equal-length prompts: no padding)

    def run() -> None:
        with torch.no_grad():
            out = policy.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                num_return_sequences=n,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                pad_token_id=0,
            )
        assert out.shape == (len(prompts) * n, ids.shape[1] + tokens)

    timed(run, 1)  # warm-up
    return [len(prompts) * n * tokens / t for t in timed(run, repeats)]


def bench_vllm(
    engine: VLLMEngine, policy: torch.nn.Module, prompts: list[list[int]], n: int, tokens: int, repeats: int
) -> tuple[list[float], dict[str, dict[str, float]]]:
    """Tokens/s of VLLMEngine.generate and the per-mode sync times (median snapshot and load seconds)."""
    sampling = SamplingConfig(max_new_tokens=tokens, temperature=1.0, seed=0)
    engine.sync(policy, 0)
    engine.generate(prompts, n, sampling)  # warm-up (engine start, first adapter)

    def run() -> None:
        gens = engine.generate(prompts, n, sampling)
        assert sum(len(g.token_ids) for g in gens) == len(prompts) * n * tokens

    rates = [len(prompts) * n * tokens / t for t in timed(run, repeats)]
    syncs: dict[str, dict[str, float]] = {}
    for mode in ("files", "tensors"):
        engine.config.sync_mode = mode
        snap, load = [], []
        for version in range(1, 2 + repeats):
            start = time.perf_counter()
            engine.sync(policy, version)
            mid = time.perf_counter()
            engine._push_pending()  # what the next generate does first
            snap.append(mid - start)
            load.append(time.perf_counter() - mid)
        syncs[mode] = {"snapshot_s": statistics.median(snap[1:]), "load_s": statistics.median(load[1:])}
        syncs[mode]["total_s"] = syncs[mode]["snapshot_s"] + syncs[mode]["load_s"]
    return rates, syncs


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and return (and print) its results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", help="model folder (default: data/tiny if present, else --config-from tiny)"
    )
    parser.add_argument("--config-from", choices=sorted(PRESETS), help="build a random Qwen2 of this shape")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="generations per prompt")
    parser.add_argument("--new-tokens", type=int, default=64, help="forced completion length")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt length in tokens (random ids)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lora-rank", type=int, default=32, help="Tina's main recipes use 32")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--engines", default="vllm,hf", help="comma-separated subset of vllm,hf")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--kv-cache-gib", type=float, default=None, help="CPU KV-cache size")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    tmp = None
    if args.model:
        model_path, source = args.model, args.model
    elif args.config_from is None and (TINY_DIR / "config.json").is_file():
        model_path, source = str(TINY_DIR), "data/tiny"
    else:
        preset = args.config_from or "tiny"
        tmp = tempfile.TemporaryDirectory(prefix=f"random-{preset}-")
        model_path, source = tmp.name, f"random {preset}"
        build_random_qwen2(preset, Path(tmp.name), torch.bfloat16 if preset == "qwen1.5b" else torch.float32)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
    torch_dtype = getattr(torch, dtype)
    policy = lora_policy(model_path, args.lora_rank, torch_dtype)
    vocab = policy.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, vocab - 1, (args.prompts, args.prompt_len), generator=gen).tolist()

    result: dict = dict(
        model=source,
        params=sum(p.numel() for p in policy.parameters()),
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{args.threads} threads",
        dtype=dtype,
        prompts=args.prompts,
        n=args.n,
        new_tokens=args.new_tokens,
        prompt_len=args.prompt_len,
        lora_rank=args.lora_rank,
        repeats=args.repeats,
    )
    engines = args.engines.split(",")
    if "vllm" in engines:
        max_len = args.prompt_len + args.new_tokens
        config = VLLMConfig(max_model_len=max_len, kv_cache_gib=args.kv_cache_gib, ignore_eos=True)
        engine = VLLMEngine(model_path, dtype=dtype, max_lora_rank=args.lora_rank, config=config)
        try:
            rates, syncs = bench_vllm(engine, policy, prompts, args.n, args.new_tokens, args.repeats)
        finally:
            engine.close()
        result.update(vllm_tokens_per_s=statistics.median(rates), vllm_runs=rates, sync=syncs)
    if "hf" in engines:
        rates = bench_hf(policy, prompts, args.n, args.new_tokens, args.repeats)
        result.update(hf_tokens_per_s=statistics.median(rates), hf_runs=rates)
    if tmp is not None:
        tmp.cleanup()

    print(
        f"{result['model']} ({result['params'] / 1e6:.2f}M params, {dtype}, {result['device']}), "
        f"{args.prompts} prompts x {args.n} x {args.new_tokens} tokens, median of {args.repeats}"
    )
    for name in ("vllm", "hf"):
        if f"{name}_tokens_per_s" in result:
            print(f"  {name:<6} {result[f'{name}_tokens_per_s']:>10.0f} tokens/s")
    for mode, t in result.get("sync", {}).items():
        print(
            f"  sync {mode:<8} {1e3 * t['total_s']:8.1f} ms (snapshot {1e3 * t['snapshot_s']:.1f} + load "
            f"{1e3 * t['load_s']:.1f})"
        )
    print("JSON " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
