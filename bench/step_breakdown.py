"""One lightning_tina GRPO step taken apart: where the time and the memory go.

Drives GRPOModule's pieces directly (no Trainer), in the order `training_step` runs them: adapter sync ->
rollout (engine + padding) -> reward scoring and advantages -> reference log-probs -> policy forward (log-probs and
loss) -> backward -> optimizer (clip + AdamW). The forward/loss code is the same sequence of `lightning_tina.grpo`
calls as `GRPOModule._optimizer_step`, split only to put a timer between forward and backward.

    python bench/step_breakdown.py                          # 18m model, HF engine, 8 prompts x 4 x 64 tokens
    python bench/step_breakdown.py --engine vllm --size tiny
    python bench/step_breakdown.py --gpu                    # 1.5B-shaped Qwen2, bf16, checkpointing, 512 + 3584

Prints a table (median seconds per phase over the measured steps, wall and process CPU time) and one JSON line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

PHASES = ["sync", "rollout", "reward", "ref_logps", "policy_forward", "backward", "optimizer"]


def build_module(model: str, args: argparse.Namespace) -> Any:
    """A configured GRPOModule on the bench device with the bench's LoRA and GRPO settings."""
    from lightning_tina.grpo import GRPOSettings
    from lightning_tina.module import GRPOModule
    from lightning_tina.optim import OptimSettings
    from lightning_tina.policy import LoRASettings
    from lightning_tina.rewards import RewardSpec

    n = args.prompts * args.generations
    module = GRPOModule(
        model=model,
        lora=LoRASettings(r=args.lora_r, alpha=args.lora_alpha, dropout=0.0, fused=not args.no_fused_lora),
        grpo=GRPOSettings(
            num_generations=args.generations,
            batch_size=n,
            micro_batch_size=args.micro_batch or n,
            beta=args.beta,
            loss_type="grpo",
            gradient_checkpointing=args.gradient_checkpointing,
            share_prompt=not args.no_share_prompt,
            trim_padding=not args.no_trim_padding,
            micro_batch_tokens={-1: "auto", 0: None}.get(args.micro_batch_tokens, args.micro_batch_tokens),
        ),
        optim=OptimSettings(lr=1e-6, warmup_ratio=0.0),
        rewards=[RewardSpec("accuracy", 1.0), RewardSpec("format", 1.0)],
        dtype=args.dtype,
        attn_implementation=args.attn,
        fused_norm=not args.no_fused_norm,
    )
    module.configure_model()
    module.policy.to(args.device)
    return module


def prompt_batches(module: Any, args: argparse.Namespace, n_steps: int) -> list[Any]:
    """One PromptBatch per step: tiny-task prompts, or with --prompt-tokens random ids of exactly that length."""
    import torch

    from lightning_tina.types import PromptBatch

    rows = common.bench_rows(args.prompts * n_steps, args.seed)
    _, ids = common.render_prompts(module.tokenizer, rows)
    if args.prompt_tokens:
        g = torch.Generator().manual_seed(args.seed)
        high = len(module.tokenizer)
        ids = torch.randint(3, high, (len(rows), args.prompt_tokens), generator=g).tolist()  # [B*steps, P]
    p = args.prompts
    return [PromptBatch(prompt_ids=ids[i : i + p], rows=rows[i : i + p]) for i in range(0, len(rows), p)]


def synthetic_rollouts(module: Any, args: argparse.Namespace, step: int) -> Any:
    """Rollouts of random tokens: --prompt-tokens + --tokens per row, or with --length-spread completions of random
    lengths right-padded to --tokens (no generation, no text)."""
    import torch

    from lightning_tina.types import Rollouts

    vocab = module.policy.get_base_model().config.vocab_size
    prompt, completion = common.synthetic_sequences(
        args.prompts, args.generations, args.prompt_tokens or 32, args.tokens, vocab, args.seed + step
    )  # [N, P], [N, C]
    n, c = completion.shape
    completion_mask = common.synthetic_completion_mask(n, c, args.length_spread, args.seed + step)  # [N, C]
    completion = completion * completion_mask  # padding: id 0
    ids = torch.cat([prompt, completion], 1).to(args.device)  # [N, P+C]
    return Rollouts(
        input_ids=ids,
        attention_mask=torch.cat([torch.ones_like(prompt), completion_mask], 1).to(args.device),  # [N, P+C]
        completion_mask=completion_mask.to(args.device),  # [N, C]
        completions=[""] * n,
        rows=[{"problem": "", "solution": "$0$"}] * n,
        truncated=torch.ones(n, dtype=torch.bool),
        engine_logprobs=None,
    )


def one_step(
    module: Any, engine: Any, opt: Any, batch: Any, args: argparse.Namespace, t: common.PhaseTimer
) -> tuple[int, int]:
    """Run one GRPO step with a timer around each phase; returns (generated tokens, tokens trained on)."""
    import torch

    from lightning_tina import grpo
    from lightning_tina.rollout.base import SamplingConfig
    from lightning_tina.rollout.batch import make_rollouts

    g = module.grpo
    amp = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    if engine is None:  # --synthetic: the training part only
        rollouts = module.ordered_for_micro_batches(batch)  # as training_step
        adv = torch.randn(rollouts.input_ids.shape[0], generator=torch.Generator().manual_seed(0)).to(
            args.device
        )
        tokens = 0
    else:
        with t.phase("sync"):
            engine.sync(module.policy, module.policy_version)
            if hasattr(
                engine, "_push_pending"
            ):  # vLLM loads the snapshot lazily: time it here, not in rollout
                engine._engine()
                engine._push_pending()
        with t.phase("rollout"):  # not under autocast: the engines run in their own dtype
            sampling = SamplingConfig(max_new_tokens=args.tokens, temperature=1.0)
            gens = engine.generate(batch.prompt_ids, g.num_generations, sampling)
            rollouts = module.ordered_for_micro_batches(
                make_rollouts(batch, gens, g.num_generations, module.tokenizer)
            )
            rollouts = rollouts._replace(
                input_ids=rollouts.input_ids.to(args.device),
                attention_mask=rollouts.attention_mask.to(args.device),
                completion_mask=rollouts.completion_mask.to(args.device),
                engine_logprobs=None,  # the trainer-side log-prob check is not part of this breakdown
            )
            tokens = sum(len(x.token_ids) for x in gens)
        with t.phase("reward"):
            scores = module.rewards(rollouts.completions, rollouts.rows, group_size=g.num_generations)
            adv = grpo.group_advantages(
                scores.total.to(args.device), g.num_generations, g.scale_rewards
            )  # [N]
    with t.phase("ref_logps"), amp:
        ref = module._frozen_logprobs(rollouts, reference=True) if g.beta > 0 else None  # [N, C]
    mask = rollouts.completion_mask  # [N, C]
    n, c = mask.shape
    opt.zero_grad()
    module.policy.train()
    for sl in module._micro_batches(rollouts):
        with t.phase("policy_forward"), amp:
            logps, _ = module.sequence_logprobs(
                module.policy,
                rollouts.input_ids[sl],
                rollouts.attention_mask[sl],
                c,
                packed=isinstance(sl, torch.Tensor),  # a packed pass (model.grpo.micro_batch_tokens)
            )
            per_token, _, _ = grpo.clipped_surrogate(
                logps, logps.detach(), adv[sl], g.epsilon_low, g.epsilon_high
            )
            if ref is not None:
                per_token = per_token + g.beta * grpo.k3_kl(logps, ref[sl])  # [n', C]
            loss = grpo.aggregate_loss(per_token, mask[sl], g.loss_type, num_sequences=n)
        with t.phase("backward"):
            loss.backward()
    with t.phase("optimizer"):
        params = [p for p in module.policy.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, g.max_grad_norm)
        opt.step()
        module.policy_version += 1
    return tokens, int(rollouts.attention_mask.sum())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build everything, run warm-up and measured steps, and return the per-phase medians."""
    from lightning_tina.optim import build_optimizer
    from lightning_tina.rollout import make_engine
    from lightning_tina.rollout.vllm import VLLMConfig

    model = (
        common.tiny_dir(args.tiny_dir)
        if args.size == "tiny"
        else common.build_random_qwen2(
            args.size, Path(args.workdir) / f"qwen2-{args.size}", common.tiny_dir(args.tiny_dir)
        )
    )
    rss_before = common.rss_bytes()
    module = build_module(str(model), args)
    # Forced length: HF generate takes min_new_tokens from the model's generation config; vLLM ignores EOS.
    module.policy.get_base_model().generation_config.min_new_tokens = args.tokens
    vllm_cfg = VLLMConfig(
        ignore_eos=True,
        kv_cache_gib=args.kv_cache_gib,
        max_model_len=args.max_model_len,
        dtype=args.rollout_dtype,
        weight_sync=args.weight_sync,
    )
    engine = (
        None
        if args.synthetic
        else make_engine(
            args.engine,
            model_name=str(model),
            policy=module.policy,
            tokenizer=module.tokenizer,
            dtype=args.dtype,
            lora_rank=args.lora_r,
            vllm=vllm_cfg,
        )
    )
    params = [p for p in module.policy.parameters() if p.requires_grad]
    opt, _ = build_optimizer(params, module.optim, args.warmup + args.steps)
    n_steps = args.warmup + args.steps
    if args.synthetic:
        batches = [synthetic_rollouts(module, args, i) for i in range(n_steps)]
    else:
        batches = prompt_batches(module, args, n_steps)
    wall: dict[str, list[float]] = {p: [] for p in PHASES + ["step"]}
    cpu: dict[str, list[float]] = {p: [] for p in PHASES + ["step"]}
    peaks: dict[str, int] = {}
    tokens_per_s: list[float] = []
    train_tokens_per_s: list[float] = []  # prompt + completion tokens through reference, forward and backward
    train_tokens_per_cpu_s: list[float] = []
    for i, batch in enumerate(batches):
        t = common.PhaseTimer()
        c0, w0 = time.process_time(), time.perf_counter()
        tokens, trained = one_step(module, engine, opt, batch, args, t)
        w1, c1 = time.perf_counter(), time.process_time()
        print(f"step {i}{' (warm-up)' if i < args.warmup else ''}: {w1 - w0:.3f} s", flush=True)
        if i < args.warmup:
            continue
        for p in PHASES:
            wall[p].append(t.seconds.get(p, 0.0))
            cpu[p].append(t.cpu_seconds.get(p, 0.0))
        wall["step"].append(w1 - w0)
        cpu["step"].append(c1 - c0)
        if tokens:
            tokens_per_s.append(tokens / t.seconds["rollout"])
        train = ("ref_logps", "policy_forward", "backward")
        train_tokens_per_s.append(trained / sum(t.seconds.get(p, 0.0) for p in train))
        train_tokens_per_cpu_s.append(trained / sum(t.cpu_seconds.get(p, 0.0) for p in train))
        for p, b in t.peak_bytes.items():
            peaks[p] = max(peaks.get(p, 0), b)
    if engine is not None:
        engine.close()
    med = {p: common.spread(v)["median"] for p, v in wall.items()}
    return {
        "bench": "step_breakdown",
        "model": str(model),
        "parameters": common.count_parameters(model),
        "engine": args.engine,
        "device": args.device,
        "median_s": med,
        "step_spread_s": common.spread(wall["step"]),
        "cpu_median_s": {p: common.spread(v)["median"] for p, v in cpu.items()},
        "tokens_per_s": common.spread(tokens_per_s)["median"],
        "train_tokens_per_s": common.spread(train_tokens_per_s)["median"],
        "train_tokens_per_cpu_s": common.spread(train_tokens_per_cpu_s)["median"],
        "peak_gb_by_phase": {p: b / 1e9 for p, b in peaks.items()},
        "rss_before_gb": rss_before / 1e9,
        **common.peak_memory(),
        "load_avg": common.load_avg(),
        "settings": vars(args),
        "machine": common.machine(),
    }


def main(argv: list[str] | None = None) -> None:
    """Parse options (--gpu switches to Tina's 1.5B shape and lengths), run, print table and JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="18m", choices=["tiny", "18m", "qwen1.5b"])
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64, help="completion tokens, forced")
    p.add_argument(
        "--prompt-tokens", type=int, default=0, help="random prompts of this length (0: tiny-task prompts)"
    )
    p.add_argument("--micro-batch", type=int, default=0, help="completions per forward/backward (0: all)")
    p.add_argument(
        "--micro-batch-tokens",
        type=int,
        default=-1,
        help="packed passes of at most this many tokens (model.grpo.micro_batch_tokens; 0: count-based, "
        "-1: auto, the default)",
    )
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--attn", default=None, help="model.attn_implementation (default: lightning_tina's on CPU)"
    )
    p.add_argument(
        "--rollout-dtype", default=None, choices=["float32", "bfloat16"], help="vLLM: rollout dtype"
    )
    p.add_argument(
        "--weight-sync", default="auto", choices=["auto", "lora", "merged"], help="vLLM: how weights sync"
    )
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--no-share-prompt",
        action="store_true",
        help="run every completion with its prompt (G prompt passes)",
    )
    p.add_argument(
        "--no-trim-padding",
        action="store_true",
        help="run every micro-batch at the step's longest completion (model.grpo.trim_padding false)",
    )
    p.add_argument(
        "--no-fused-norm",
        action="store_true",
        help="the model's own RMSNorm instead of the hand-written backward (model.fused_norm false)",
    )
    p.add_argument(
        "--no-fused-lora",
        action="store_true",
        help="PEFT's own LoRA forward instead of the fused function (model.lora.fused false)",
    )
    p.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast (weights stay)"
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="training part only: random prompt + completion tokens, no engine, no reward",
    )
    p.add_argument(
        "--length-spread",
        type=float,
        default=0.0,
        help="--synthetic: completion lengths drawn uniformly from [(1 - F) * tokens, tokens] per sequence "
        "(0: all exactly --tokens), the rest right padding",
    )
    p.add_argument("--steps", type=int, default=3, help="measured steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-cache-gib", type=float, default=0.5, help="vLLM on CPU: KV cache size")
    p.add_argument("--max-model-len", type=int, default=4608, help="vLLM: longest prompt + completion")
    p.add_argument("--tiny-dir", default=None)
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "lightning_tina_bench"))
    p.add_argument(
        "--gpu",
        action="store_true",
        help="CUDA, vLLM, and common.GPU_SETTINGS: 1.5B-shaped random Qwen2, bf16, gradient "
        "checkpointing, 512 prompt + 3584 completion tokens, LoRA r=32 alpha=128, micro-batch 4",
    )
    args = p.parse_args(argv)
    args.device = "cpu"
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            p.error("--gpu needs a CUDA GPU (torch.cuda.is_available() is False)")
        vars(args).update(common.GPU_SETTINGS, device="cuda", engine="vllm")
    common.pin_threads(args.threads)
    r = run(args)
    wall, cpu = r["median_s"], r["cpu_median_s"]
    rows = [
        {
            "phase": ph,
            "wall_s": wall[ph],
            "cpu_s": cpu[ph],
            "cpu_share": cpu[ph] / cpu["step"],
            "peak_gb": r["peak_gb_by_phase"].get(ph, float("nan")),
        }
        for ph in PHASES + ["step"]
    ]
    title = (
        f"\n{Path(r['model']).name} ({r['parameters'] / 1e6:.1f}M), engine {args.engine}, {args.prompts}x"
        f"{args.generations}x{args.tokens} tokens, {args.steps} steps, load {r['load_avg']:.1f}"
    )
    common.print_table(
        rows, ["phase", "wall_s", "cpu_s", "cpu_share"] + (["peak_gb"] if args.gpu else []), title=title
    )
    sp = r["step_spread_s"]
    print(
        f"step: median {sp['median']:.3f} s (min {sp['min']:.3f}, max {sp['max']:.3f}), process CPU "
        f"{cpu['step']:.3f} s; rollout {r['tokens_per_s']:.0f} tokens/s; training (reference + forward + backward) "
        f"{r['train_tokens_per_s']:.0f} tokens/s; peak RSS {r['peak_rss_gb']:.2f} GB"
    )
    common.emit_json(r)


if __name__ == "__main__":
    main()
