"""Rollout throughput: the colocated vLLM engine against plain Hugging Face `generate`, and the weight sync time.

Every engine samples P prompts x n completions of exactly T new tokens (EOS suppressed with min_new_tokens) from
the same PEFT LoRA policy and reports completion tokens per wall second and per CPU second of this process
(steadier on a shared machine), medians over interleaved repeats after one warm-up. vLLM serves the policy either
as a LoRA (`vllm`, `vllm-plain`) or merged into full weights (`vllm-merged`), in the trainer's dtype or in
--rollout-dtype. The sync time is `VLLMEngine.sync` (snapshot: adapter copy, or merge) plus loading it into vLLM.
One vLLM engine per process: run `vllm`/`vllm-plain` and `vllm-merged` in separate invocations.

    python bench/rollout_throughput.py                         # data/tiny if present, else a random tiny Qwen2
    python bench/rollout_throughput.py --config-from 18m --engines vllm-merged,hf --rollout-dtype bfloat16
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
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # colocated: engine core in this process

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import SHAPES, load_avg, machine, tiny_dir  # noqa: E402  (bench/ is on sys.path when a script runs)
from common import build_random_qwen2 as build_shared_shape  # noqa: E402

from lightning_tina.policy import TINA_TARGET_MODULES  # noqa: E402
from lightning_tina.rollout.base import SamplingConfig  # noqa: E402
from lightning_tina.rollout.vllm import VLLMConfig, VLLMEngine  # noqa: E402
from lightning_tina.rollout.vllm_worker import install_cpu_single_lora_fast_path  # noqa: E402

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
    "qwen1.5b": SHAPES["qwen1.5b"],  # one definition of the 1.5B shape, in bench/common.py
    "18m": SHAPES[
        "18m"
    ],  # built by bench/common.py with the tiny model's tokenizer, as the other bench scripts
}
VLLM_ENGINES = {
    "vllm": "lora",
    "vllm-plain": "lora",
    "vllm-merged": "merged",
}  # engine -> VLLMConfig.weight_sync
LORA_TARGETS = TINA_TARGET_MODULES


def build_random_qwen2(preset: str, out: Path, dtype: torch.dtype, layers: int | None = None) -> None:
    """Save a random-weight Qwen2 of the given shape (optionally fewer layers, for smoke tests) and a word-level
    tokenizer covering its whole vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lightning_tina.tiny.random_model import save_random_qwen2

    shape = dict(PRESETS[preset])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = shape["vocab_size"] - 1
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{eos}", pad_token="t0")
    save_random_qwen2(out, fast, dtype=dtype, device="cuda" if torch.cuda.is_available() else "cpu", **shape)


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


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """Wall and CPU seconds of one call of fn(). CPU time (all threads of this process) is what to compare on a
    shared machine: other people's load stretches wall time, not this process's CPU time."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def hf_runner(policy: torch.nn.Module, prompts: list[list[int]], n: int, tokens: int) -> Callable[[], None]:
    """One rollout with model.generate(do_sample, num_return_sequences=n), all prompts in one batch."""
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
        assert out.shape == (len(prompts) * n, ids.shape[1] + tokens)  # [P*n, L+T]

    return run


def vllm_runner(
    engine: VLLMEngine, prompts: list[list[int]], n: int, tokens: int, fast_path: bool
) -> Callable[[], None]:
    """One rollout with VLLMEngine.generate; fast_path switches the CPU single-adapter LoRA matmul."""
    sampling = SamplingConfig(max_new_tokens=tokens, min_new_tokens=tokens, temperature=1.0, seed=0)

    def run() -> None:
        if not engine.on_gpu and engine.weight_sync == "lora":
            install_cpu_single_lora_fast_path(fast_path)
        gens = engine.generate(prompts, n, sampling)
        assert sum(len(g.token_ids) for g in gens) == len(prompts) * n * tokens

    return run


def sync_times(engine: VLLMEngine, policy: torch.nn.Module, repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds of `sync` (snapshot) and of loading the snapshot into vLLM: for each adapter transport
    ("files", "tensors") with LoRA serving, or the merge and in-place load ("merged")."""
    syncs: dict[str, dict[str, float]] = {}
    for mode in ("files", "tensors") if engine.weight_sync == "lora" else ("merged",):
        if mode != "merged":
            engine._weights.transport = mode
        snap, load = [], []
        for version in range(1, 2 + repeats):  # the first is a warm-up
            engine._wake()  # GPU sleep mode: waking is part of every rollout, not of the sync
            start = time.perf_counter()
            engine.sync(policy, version)
            mid = time.perf_counter()
            engine._weights.push(engine._llm, engine._lora_enabled)  # what the next generate does first
            snap.append(mid - start)
            load.append(time.perf_counter() - mid)
        t = {"snapshot_s": statistics.median(snap[1:]), "load_s": statistics.median(load[1:])}
        syncs[mode] = {**t, "total_s": t["snapshot_s"] + t["load_s"]}
    return syncs


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and return (and print) its results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", help="model folder (default: data/tiny if present, else --config-from tiny)"
    )
    parser.add_argument(
        "--config-from",
        choices=sorted(PRESETS),
        help="build a random Qwen2 of this shape (18m: bench/common.py's, with the tiny tokenizer)",
    )
    parser.add_argument("--layers", type=int, help="override the preset's layer count (smoke tests)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="generations per prompt")
    parser.add_argument("--new-tokens", type=int, default=64, help="forced completion length")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt length in tokens (random ids)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lora-rank", type=int, default=32, help="Tina's main recipes use 32")
    parser.add_argument("--dtype", default="auto", help="policy dtype; auto: bfloat16 on GPU, float32 on CPU")
    parser.add_argument(
        "--rollout-dtype", default=None, help="vLLM's dtype (VLLMConfig.dtype); default: the policy's --dtype"
    )
    parser.add_argument(
        "--engines",
        default="vllm,hf",
        help="comma-separated: vllm (LoRA served), vllm-plain (the same with vLLM's own CPU LoRA ops instead of "
        "our fast path), vllm-merged (adapter merged into the weights; not with the other two), hf",
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--kv-cache-gib", type=float, default=None, help="CPU KV-cache size")
    parser.add_argument(
        "--no-compiled-norm",
        action="store_true",
        help="CPU: vLLM's native torch RMSNorm (VLLMConfig.cpu_compiled_norm false) instead of its compiled kernel",
    )
    parser.add_argument(
        "--no-sleep", action="store_true", help="GPU: keep vLLM awake (default: sleep between rollouts)"
    )
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
        model_path, source = (
            tmp.name,
            f"random {preset}" + (f" ({args.layers} layers)" if args.layers else ""),
        )
        if preset == "18m":
            if args.layers is not None:
                parser.error("--layers: not available with --config-from 18m (bench/common.py's fixed shape)")
            build_shared_shape("18m", Path(tmp.name), tiny_dir())
        else:
            weights_dtype = torch.bfloat16 if preset == "qwen1.5b" else torch.float32
            build_random_qwen2(preset, Path(tmp.name), weights_dtype, args.layers)
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
        rollout_dtype=args.rollout_dtype or dtype,
        prompts=args.prompts,
        n=args.n,
        new_tokens=args.new_tokens,
        prompt_len=args.prompt_len,
        lora_rank=args.lora_rank,
        repeats=args.repeats,
        compiled_norm=not args.no_compiled_norm,
    )
    engines = args.engines.split(",")
    unknown = set(engines) - {*VLLM_ENGINES, "hf"}
    if unknown or (torch.cuda.is_available() and "vllm-plain" in engines):
        parser.error(f"--engines: use vllm, vllm-plain (CPU only), vllm-merged and hf; got {args.engines}")
    methods = {VLLM_ENGINES[e] for e in engines if e in VLLM_ENGINES}
    if len(methods) > 1:
        parser.error("--engines: vllm-merged needs its own run (one vLLM engine per process)")
    runners: dict[str, Callable[[], None]] = {}
    engine = None
    if methods:
        config = VLLMConfig(
            max_model_len=args.prompt_len + args.new_tokens,
            kv_cache_gib=args.kv_cache_gib,
            enable_sleep_mode=False if args.no_sleep else None,
            weight_sync=methods.pop(),  # type: ignore[arg-type]
            dtype=args.rollout_dtype,
            cpu_compiled_norm=not args.no_compiled_norm,
        )
        engine = VLLMEngine(model_path, dtype=dtype, max_lora_rank=args.lora_rank, config=config)
        engine.sync(policy, 0)
        for name in VLLM_ENGINES:
            if name in engines:
                runners[name] = vllm_runner(
                    engine, prompts, args.n, args.new_tokens, fast_path=name == "vllm"
                )
    if "hf" in engines:
        runners["hf"] = hf_runner(policy, prompts, args.n, args.new_tokens)
    try:
        # Interleaved repeats, so that the load of this shared machine hits every engine alike.
        tokens = args.prompts * args.n * args.new_tokens
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
        for rep in range(args.repeats + 1):  # repeat 0 is a warm-up (engine start, first adapter)
            for name, run in runners.items():
                wall, cpu = timed(run)
                if rep:
                    runs[name].append((tokens / wall, tokens / cpu))
        for name, rates in runs.items():
            result[f"{name}_tokens_per_s"] = statistics.median(r[0] for r in rates)
            result[f"{name}_tokens_per_cpu_s"] = statistics.median(r[1] for r in rates)
            result[f"{name}_runs"] = [round(r[0]) for r in rates]
        if engine is not None:
            result["sync"] = sync_times(engine, policy, args.repeats)
        result["load_avg_1min"] = load_avg()
        result["machine"] = machine()
    finally:
        if engine is not None:
            engine.close()
    if tmp is not None:
        tmp.cleanup()

    print(
        f"{result['model']} ({result['params'] / 1e6:.2f}M params, {dtype}, vLLM {result['rollout_dtype']}, "
        f"{result['device']}), {args.prompts} prompts x {args.n} x {args.new_tokens} tokens, median of "
        f"{args.repeats}; load average {result.get('load_avg_1min', float('nan')):.2f}"
    )
    for name in (*VLLM_ENGINES, "hf"):
        if f"{name}_tokens_per_s" in result:
            print(
                f"  {name:<11} {result[f'{name}_tokens_per_s']:>8.0f} tokens/s wall "
                f"{result[f'{name}_tokens_per_cpu_s']:>8.0f} tokens/CPU-s"
            )
    for mode, t in result.get("sync", {}).items():
        print(
            f"  sync {mode:<8} {1e3 * t['total_s']:8.1f} ms (snapshot {1e3 * t['snapshot_s']:.1f} + load "
            f"{1e3 * t['load_s']:.1f})"
        )
    print("JSON " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
