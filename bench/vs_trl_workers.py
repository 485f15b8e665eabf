"""The worker runs of bench/vs_trl.py: one tool, one engine, one model size per subprocess.

`worker(args)` trains lightning_tina (GRPOModule + RolloutCallback under lightning.Trainer), TRL's GRPOTrainer, or
TRL's training part alone (`--train-only` / `--gpu`), and prints one JSON record. The settings shared by both tools
are the constants below; bench/vs_trl.py starts these runs and compares them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import common

PROMPTS, GENERATIONS, BETA, LORA_R, LORA_ALPHA, LR = 8, 4, 0.04, 8, 32, 1e-6
LT_ENGINES = ["hf", "vllm", "vllm-bf16", "vllm-lora"]


def _prompt_data(
    model_dir: str, n_steps: int, seed: int
) -> tuple[Any, list[dict], list[str], list[list[int]]]:
    from lightning_tina.policy import load_tokenizer

    tok = load_tokenizer(model_dir)
    rows = common.bench_rows(PROMPTS * n_steps, seed)
    texts, ids = common.render_prompts(tok, rows)
    return tok, rows, texts, ids


def _step_times(ends: list[float], warmup: int) -> list[float]:
    """Seconds of the measured steps: differences of consecutive step-end times after the warm-up steps."""
    return [b - a for a, b in zip(ends[warmup - 1 : -1], ends[warmup:], strict=True)]


def run_lightning_tina(args: argparse.Namespace) -> dict[str, Any]:
    """Train with GRPOModule + RolloutCallback under a Lightning Trainer; returns step times and phase medians."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_tina.callbacks.rollout import RolloutCallback
    from lightning_tina.grpo import GRPOSettings
    from lightning_tina.module import GRPOModule
    from lightning_tina.optim import OptimSettings
    from lightning_tina.policy import LoRASettings
    from lightning_tina.rewards import RewardSpec
    from lightning_tina.rollout.base import SamplingConfig
    from lightning_tina.rollout.vllm import VLLMConfig
    from lightning_tina.types import PromptBatch

    n_steps = args.warmup + args.steps
    tok, rows, _, ids = _prompt_data(args.model, n_steps, args.seed)
    batches = [
        PromptBatch(prompt_ids=ids[i : i + PROMPTS], rows=rows[i : i + PROMPTS])
        for i in range(0, len(rows), PROMPTS)
    ]
    n = PROMPTS * GENERATIONS
    module = GRPOModule(
        model=args.model,
        lora=LoRASettings(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0),
        grpo=GRPOSettings(
            num_generations=GENERATIONS, batch_size=n, micro_batch_size=n, beta=BETA, loss_type="grpo"
        ),
        optim=OptimSettings(lr=LR, warmup_ratio=0.0),
        rewards=[RewardSpec("accuracy", 1.0), RewardSpec("format", 1.0)],
        dtype=args.dtype,
    )
    module.configure_model()
    engine, _, variant = args.engine.partition("-")  # LT_ENGINES: "vllm-bf16" = vLLM with bf16 rollouts, ...
    rollout = RolloutCallback(
        engine=engine,
        # the forced length: both engines suppress EOS until min_new_tokens
        sampling=SamplingConfig(max_new_tokens=args.tokens, min_new_tokens=args.tokens, temperature=1.0),
        num_generations=GENERATIONS,
        vllm=VLLMConfig(
            kv_cache_gib=0.5,
            dtype="bfloat16" if variant == "bf16" else None,
            weight_sync="lora" if variant == "lora" else "auto",  # auto: merged weights on CPU
        ),
    )
    ends: list[float] = []
    cpu_ends: list[
        float
    ] = []  # process CPU time: far less sensitive than wall time to other users of the cores
    phases: dict[str, list[float]] = {}
    lengths: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())
            m = trainer.callback_metrics
            for key in ("perf/rollout_s", "perf/reward_s", "perf/train_s", "perf/sync_s"):
                if key in m:
                    phases.setdefault(key.split("/")[1].removesuffix("_s"), []).append(float(m[key]))
            lengths.append(float(m["train/completion_length_mean"]))

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed" if args.precision == "bf16" else "32-true",  # autocast, as TRL's bf16=True
        max_steps=n_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=[rollout, Clock()],
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=_identity))
    return _record(ends, cpu_ends, phases, lengths, args.warmup)


def _record(
    ends: list[float],
    cpu_ends: list[float],
    phases: dict[str, list[float]],
    lengths: list[float],
    warmup: int,
) -> dict[str, Any]:
    """One run's step times (wall and CPU) after `warmup` steps, phase medians and completion lengths."""
    return {
        "step_s": _step_times(ends, warmup),
        "cpu_step_s": _step_times(cpu_ends, warmup),
        "phases": {k: common.spread(v[warmup:])["median"] for k, v in phases.items()},
        "completion_length": sorted(set(lengths)),
    }


def _identity(x: Any) -> Any:
    return x


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    """Train with TRL's GRPOTrainer (generation by transformers `generate`); returns step times and phases."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    n_steps = args.warmup + args.steps
    tok, rows, texts, _ = _prompt_data(args.model, n_steps, args.seed)
    dataset = Dataset.from_dict({"prompt": texts, "solution": [r["solution"] for r in rows]})
    phases: dict[str, list[float]] = {}

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with wall-clock timers around generation, rewards and log-prob passes."""

        def _timed(self, name: str, fn, *a, **kw):
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                phases.setdefault(name, []).append(time.perf_counter() - start)
                phases.setdefault(f"cpu_{name}", []).append(time.process_time() - cpu_start)

        def _generate_single_turn(self, *a, **kw):
            return self._timed("rollout", super()._generate_single_turn, *a, **kw)

        def _calculate_rewards(self, *a, **kw):
            return self._timed("reward", super()._calculate_rewards, *a, **kw)

        def _get_per_token_logps_and_entropies(self, *a, **kw):
            name = "policy_logps" if torch.is_grad_enabled() else "frozen_logps"
            return self._timed(name, super()._get_per_token_logps_and_entropies, *a, **kw)

    ends: list[float] = []
    cpu_ends: list[
        float
    ] = []  # process CPU time: far less sensitive than wall time to other users of the cores
    lengths: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args_, state, control, **kw) -> None:
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())

        def on_log(self, args_, state, control, logs=None, **kw) -> None:
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        per_device_train_batch_size=PROMPTS * GENERATIONS,  # completions per step
        num_generations=GENERATIONS,
        max_completion_length=args.tokens,
        generation_kwargs={"min_new_tokens": args.tokens},
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=BETA,
        loss_type="grpo",
        scale_rewards="group",
        reward_weights=[1.0, 1.0],
        learning_rate=LR,
        max_grad_norm=1.0,
        max_steps=n_steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        shuffle_dataset=False,
        bf16=args.precision == "bf16",  # TRL's default is bf16 autocast; float32 unless --precision bf16
        gradient_checkpointing=False,  # TRL's default is on; lightning_tina's is off
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
    )
    # engine "hf-eager": TRL with transformers' eager attention instead of its default (SDPA), for reference
    attn = {"attn_implementation": "eager"} if args.engine == "hf-eager" else {}
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, **attn)
    trainer = TimedGRPOTrainer(
        model=model,
        reward_funcs=[common.trl_accuracy, common.trl_format],
        args=config,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=LoraConfig(
            r=LORA_R,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.0,
            target_modules=common.LORA_TARGETS,
            task_type="CAUSAL_LM",
        ),
        callbacks=[Clock()],
    )
    trainer.train()
    return _record(ends, cpu_ends, phases, lengths, args.warmup)


def run_trl_training_part(args: argparse.Namespace) -> dict[str, Any]:
    """TRL's own loss code on fixed random rollouts: reference log-probs, then compute_loss + backward per
    micro-batch, as its training step runs them (generation and rewards excluded). Mirrors
    `step_breakdown.py --synthetic` phase for phase."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    gpu = args.device == "cuda"
    n, micro = args.prompts * GENERATIONS, args.micro_batch or args.prompts * GENERATIONS
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        per_device_train_batch_size=n,
        num_generations=GENERATIONS,
        max_completion_length=args.tokens,
        beta=BETA,
        loss_type="grpo",
        bf16=args.precision == "bf16",
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        report_to="none",
        use_cpu=not gpu,
    )
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype),
        reward_funcs=[common.trl_format],
        args=config,
        train_dataset=Dataset.from_dict({"prompt": ["x"] * n}),
        peft_config=LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=0.0,
            target_modules=common.LORA_TARGETS,
            task_type="CAUSAL_LM",
        ),
    )
    model, device = trainer.model, trainer.accelerator.device
    if args.gradient_checkpointing:  # Trainer.train() would enable it; the loss is driven directly here
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer.current_gradient_accumulation_steps = -(-n // micro)  # the loss divides by the accumulation steps
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    vocab = model.get_base_model().config.vocab_size
    wall: dict[str, list[float]] = {"ref_logps": [], "forward_backward": [], "optimizer": []}
    tokens_per_s, tokens_per_cpu_s, peak = [], [], 0
    for step in range(args.warmup + args.steps):
        prompt, completion = common.synthetic_sequences(
            args.prompts, GENERATIONS, args.prompt_tokens, args.tokens, vocab, args.seed + step
        )  # [N, P], [N, C]
        completion_mask = common.synthetic_completion_mask(
            n, args.tokens, args.length_spread, args.seed + step
        )  # [N, C]: the lengths step_breakdown.py --synthetic draws
        completion = completion * completion_mask  # padding: id 0
        prompt, completion = prompt.to(device), completion.to(device)
        completion_mask = completion_mask.to(device)
        ids = torch.cat([prompt, completion], 1)  # [N, P+C]
        attention_mask = torch.cat([torch.ones_like(prompt), completion_mask], 1)  # [N, P+C]
        t = common.PhaseTimer()
        model.train()
        with t.phase("ref_logps"), torch.no_grad(), model.disable_adapter():
            ref, _, _ = trainer._get_per_token_logps_and_entropies(
                model, ids, attention_mask, args.tokens, batch_size=micro
            )  # [N, C]
        advantages = torch.randn(n, generator=torch.Generator().manual_seed(step)).to(device)  # [N]
        opt.zero_grad()
        for i in range(0, n, micro):
            sl = slice(i, i + micro)
            inputs = {
                "prompt_ids": prompt[sl],
                "prompt_mask": torch.ones_like(prompt[sl]),
                "completion_ids": completion[sl],
                "completion_mask": completion_mask[sl],
                "advantages": advantages[sl],
                "ref_per_token_logps": ref[sl],
                "old_per_token_logps": None,
            }
            with t.phase("forward_backward"):
                trainer.accelerator.backward(trainer.compute_loss(model, inputs))
        with t.phase("optimizer"):
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
            opt.step()
        print(f"step {step}: {sum(t.seconds.values()):.3f} s", flush=True)
        if step < args.warmup:
            continue
        for k in wall:
            wall[k].append(t.seconds[k])
        real = int(attention_mask.sum())  # prompt + completion tokens, padding not counted
        tokens_per_s.append(real / (t.seconds["ref_logps"] + t.seconds["forward_backward"]))
        tokens_per_cpu_s.append(real / (t.cpu_seconds["ref_logps"] + t.cpu_seconds["forward_backward"]))
        peak = max([peak, *t.peak_bytes.values()])
    return {
        "median_s": {k: common.spread(v)["median"] for k, v in wall.items()},
        "train_tokens_per_s": common.spread(tokens_per_s)["median"],
        "train_tokens_per_cpu_s": common.spread(tokens_per_cpu_s)["median"],
        "train_peak_gb": peak / 1e9,
    }


def worker(args: argparse.Namespace) -> None:
    """Entry point of one run: pin threads, train, print one JSON record."""
    common.pin_threads(args.threads)
    start = time.perf_counter()
    if args.worker == "trl-train":
        out = run_trl_training_part(args)
    else:
        out = run_trl(args) if args.worker == "trl" else run_lightning_tina(args)
    out.update(
        tool=args.worker,
        engine=args.engine,
        model=args.model,
        wall_s=time.perf_counter() - start,
        load_avg=common.load_avg(),
        threads=args.threads,
        **common.peak_memory(),
    )
    common.emit_json(out)
