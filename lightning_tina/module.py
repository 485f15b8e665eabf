"""GRPOModule: the LoRA policy, its reference, and one GRPO update per training step.

training_step reads top to bottom as the data flow:
prompts (the batch) -> rollouts (RolloutCallback's engine) -> rewards -> advantages -> loss -> optimizer step.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import lightning as L
import torch

from lightning_tina import grpo
from lightning_tina.attention import CPU_ATTENTION, register_cpu_attention
from lightning_tina.fused_norm import install_fused_rms_norm
from lightning_tina.grpo import GRPOSettings
from lightning_tina.logprobs import completion_logprobs
from lightning_tina.optim import OptimSettings, build_optimizer
from lightning_tina.policy import (
    LoRASettings,
    frozen_reference,
    load_causal_lm,
    load_tokenizer,
    reference_mode,
    shard_fsdp2,
    whole,
    wrap_lora,
)
from lightning_tina.rewards import RewardSet, RewardSpec
from lightning_tina.rollout.batch import order_groups_by_length
from lightning_tina.types import GRPOStats, PromptBatch, Rollouts


def _default_rewards() -> list[RewardSpec]:
    return [RewardSpec(name="accuracy", weight=1.0), RewardSpec(name="format", weight=1.0)]


@dataclass
class EvalSettings:
    """How `validate`/`test` score the policy on the DataModule's held-out prompts."""

    k: int = 4
    """Samples per problem; pass@1 is their mean."""
    temperature: float = 0.6
    """Sampling temperature (Tina's evaluation: 0.6)."""
    top_p: float = 0.95
    """Nucleus mass (Tina's evaluation: 0.95)."""
    max_new_tokens: int = 256
    """Longest completion."""


class GRPOModule(L.LightningModule):
    """A causal LM trained with GRPO, through a LoRA adapter by default.

    Args:
        model: local directory or hub id of the base causal LM (its tokenizer is loaded from the same place).
        lora: the adapter; `lora.enabled: false` trains all weights against a frozen reference copy.
        grpo: the objective (see GRPOSettings for what is on by default).
        optim: AdamW and its warmup-cosine schedule.
        rewards: reward functions by name or import path, with weights and parameters.
        dtype: weights' dtype: float32, bfloat16 or float16.
        attn_implementation: passed to from_pretrained (e.g. "sdpa", "flash_attention_2"); None = the library's
            default with CUDA, lightning_tina's size-adaptive CPU attention without (lightning_tina/attention.py).
        fused_norm: RMSNorm layers with frozen weights run with a hand-written backward (lightning_tina/fused_norm.py;
            the same output, fewer element-wise passes); False: the model's own RMSNorm.
        eval: sampling for validate/test.
    """

    def __init__(
        self,
        model: str = "data/tiny",
        lora: LoRASettings = LoRASettings(),
        grpo: GRPOSettings = GRPOSettings(),
        optim: OptimSettings = OptimSettings(),
        rewards: list[RewardSpec] | None = None,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        fused_norm: bool = True,
        eval: EvalSettings = EvalSettings(),
    ) -> None:
        super().__init__()
        self.model_name = model
        self.lora = replace(lora)  # copies: the defaults are shared instances
        self.grpo = replace(grpo)
        self.optim = replace(optim)
        self.eval_settings = replace(eval)
        self.reward_specs = list(rewards) if rewards is not None else _default_rewards()
        self.dtype_name = dtype
        self.attn_implementation = attn_implementation
        self.fused_norm = fused_norm
        self._validate()
        self.rewards = RewardSet(self.reward_specs)
        self.tokenizer = load_tokenizer(model)
        self.automatic_optimization = False  # GRPO may take several optimizer steps per rollout batch
        self.strict_loading = False  # checkpoints hold only the trainable (adapter) weights
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None  # only without LoRA
        self.rollout: Any = None  # the RolloutCallback, which registers itself in its setup()
        self.policy_version = 0  # bumped after every optimizer step; engines resync on change
        self.nonfinite_steps = 0  # updates skipped because the loss or gradient was NaN/inf
        self.save_hyperparameters(
            {
                "model": model,
                "lora": asdict(self.lora),
                "grpo": asdict(self.grpo),
                "optim": asdict(self.optim),
                "rewards": [asdict(r) for r in self.reward_specs],
                "dtype": dtype,
            }
        )

    def _validate(self) -> None:
        g = self.grpo
        if g.num_generations < 2:
            raise ValueError(
                "model.grpo.num_generations must be >= 2: advantages compare completions of a group"
            )
        if g.batch_size % g.num_generations:
            raise ValueError(
                f"model.grpo.batch_size={g.batch_size} is not a multiple of model.grpo.num_generations="
                f"{g.num_generations}; set batch_size to a multiple, e.g. {g.num_generations * max(1, g.batch_size // g.num_generations)}"
            )
        if g.micro_batch_size < 1 or g.num_iterations < 1:
            raise ValueError("model.grpo.micro_batch_size and model.grpo.num_iterations must be >= 1")

    # ---- model ---------------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Load the base model and wrap it (called by the Trainer; idempotent)."""
        if self.policy is not None:
            return
        attn = self.attn_implementation
        if attn is None and not torch.cuda.is_available():
            attn = CPU_ATTENTION  # faster than SDPA for short CPU sequences (lightning_tina/attention.py)
        if attn == CPU_ATTENTION:
            register_cpu_attention()
        base = load_causal_lm(self.model_name, self.dtype_name, attn)
        if self.fused_norm:
            install_fused_rms_norm(base)
        if self.grpo.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.config.use_cache = False
        if self.lora.enabled:
            self.policy = wrap_lora(base, self.lora)
        else:
            self.reference = frozen_reference(base)
            self.policy = base
        self.policy.train()  # from_pretrained returns eval mode; training forwards use train mode throughout
        if self.device_mesh is not None:  # Lightning's ModelParallelStrategy: shard with FSDP2
            if getattr(self._trainer and self._trainer.strategy, "_save_distributed_checkpoint", False):
                raise ValueError(
                    "ModelParallelStrategy writes sharded checkpoints that must hold every weight, but "
                    "lightning_tina's checkpoints hold only the adapter: set "
                    "trainer.strategy.init_args.save_distributed_checkpoint: false"
                )
            shard_fsdp2(self.policy, self.device_mesh, self.reference)

    def _require_policy(self) -> torch.nn.Module:
        if self.policy is None:
            self.configure_model()
        return self.policy

    def sequence_logprobs(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_len: int,
        with_entropy: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs and entropies of the last `completion_len` tokens of each sequence: ([n, C], [n, C] or None
        without `with_entropy`)."""
        g = self.grpo
        return completion_logprobs(
            model,
            input_ids,
            attention_mask,
            completion_len,
            group_size=g.num_generations,
            temperature=g.logprob_temp,
            chunk_tokens=g.logprob_chunk_tokens,
            share_prompt=g.share_prompt,
            with_entropy=with_entropy,
            trim_padding=g.trim_padding,
        )

    @torch.no_grad()
    def _frozen_logprobs(self, rollouts: Rollouts, reference: bool) -> torch.Tensor:
        """Log-probs without gradient, in eval mode, for the reference or the rollout-time (old) policy: [N, C]."""
        policy = self._require_policy()
        c = rollouts.completion_mask.shape[1]
        out = []
        was_training = policy.training
        policy.eval()
        try:
            for sl in self._micro_batches(rollouts):
                ids, am = rollouts.input_ids[sl], rollouts.attention_mask[sl]
                if reference:
                    with reference_mode(policy, self.reference) as ref:
                        out.append(self.sequence_logprobs(ref, ids, am, c, with_entropy=False)[0])
                else:
                    out.append(self.sequence_logprobs(policy, ids, am, c, with_entropy=False)[0])
        finally:
            policy.train(was_training)
        return torch.cat(out)  # [N, C]

    def ordered_for_micro_batches(self, rollouts: Rollouts) -> Rollouts:
        """With several groups per micro-batch (and trim_padding), whole groups ordered by their longest completion:
        similar lengths then share a micro-batch, so trimming its padding removes more. Otherwise unchanged."""
        g = self.grpo
        if g.trim_padding and g.num_generations < g.micro_batch_size < rollouts.input_ids.shape[0]:
            return order_groups_by_length(rollouts, g.num_generations)
        return rollouts

    def _micro_batches(self, rollouts: Rollouts) -> list[slice]:
        n, mb = rollouts.input_ids.shape[0], self.grpo.micro_batch_size
        return [slice(i, min(i + mb, n)) for i in range(0, n, mb)]

    # ---- training ------------------------------------------------------------------------------------------------

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        if self.rollout is None:
            raise RuntimeError(
                "GRPOModule needs lightning_tina.callbacks.RolloutCallback among the trainer's callbacks "
                "(the CLI adds it as the `rollout:` section)"
            )
        t0 = time.perf_counter()
        rollouts = self.ordered_for_micro_batches(
            _to_device(self.rollout.rollouts_for(batch, self), self.device)
        )
        t_rollout = time.perf_counter() - t0

        scores = self.rewards(  # per_function [N, F], total [N]
            rollouts.completions, rollouts.rows, group_size=self.grpo.num_generations
        )
        advantages = grpo.group_advantages(
            scores.total.to(self.device), self.grpo.num_generations, self.grpo.scale_rewards
        )  # [N]
        t_reward = time.perf_counter() - t0 - t_rollout

        ref_logps = self._frozen_logprobs(rollouts, reference=True) if self.grpo.beta > 0 else None  # [N, C]
        old_logps = self._frozen_logprobs(rollouts, reference=False) if self.grpo.num_iterations > 1 else None

        for _ in range(self.grpo.num_iterations):
            stats, grad_norm, extra = self._optimizer_step(rollouts, advantages, ref_logps, old_logps)
        self._log_step(rollouts, scores, advantages, stats, grad_norm, extra, t_rollout, t_reward, t0)

    def _optimizer_step(
        self,
        rollouts: Rollouts,
        advantages: torch.Tensor,
        ref_logps: torch.Tensor | None,
        old_logps: torch.Tensor | None,
    ) -> tuple[GRPOStats, torch.Tensor, dict[str, torch.Tensor]]:
        """One optimizer step over all micro-batches of the rollouts (gradients accumulated)."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        g = self.grpo
        mask = rollouts.completion_mask  # [N, C]
        n, c = mask.shape
        num_tokens = int(mask.sum())
        sums = dict(
            loss=0.0, kl=0.0, clip_low=0.0, clip_high=0.0, ratio=0.0, entropy=0.0, tis=0.0, mismatch=0.0
        )
        mismatch_max = torch.zeros(())
        opt.zero_grad()
        slices = self._micro_batches(rollouts)
        for i, sl in enumerate(slices):
            m = mask[sl]  # [n', C]
            logps, entropy = self.sequence_logprobs(
                self.policy, rollouts.input_ids[sl], rollouts.attention_mask[sl], c
            )  # [n', C] each
            assert entropy is not None  # with_entropy is on by default
            old = old_logps[sl] if old_logps is not None else logps.detach()  # [n', C]
            per_token, clip_low, clip_high = grpo.clipped_surrogate(
                logps, old, advantages[sl], g.epsilon_low, g.epsilon_high
            )  # [n', C]
            if rollouts.engine_logprobs is not None:
                diff = (logps.detach() - rollouts.engine_logprobs[sl]).abs() * m  # [n', C]
                sums["mismatch"] += float(diff.sum())
                mismatch_max = torch.maximum(mismatch_max, diff.max().cpu())
                if g.tis_cap is not None:
                    w = grpo.truncated_importance_weights(logps, rollouts.engine_logprobs[sl], g.tis_cap)
                    per_token = per_token * w
                    sums["tis"] += float((w * m).sum())
            kl = torch.zeros_like(logps)  # [n', C]
            if ref_logps is not None:
                kl = grpo.k3_kl(logps, ref_logps[sl])
                per_token = per_token + g.beta * kl
            loss = grpo.aggregate_loss(
                per_token,
                m,
                g.loss_type,
                num_sequences=n,
                num_tokens=num_tokens,
                max_completion_length=self.rollout.sampling.max_new_tokens if self.rollout else c,
            )
            # DDP all-reduces gradients in backward: only in the last micro-batch's backward of the step
            no_sync = i < len(slices) - 1 and self.trainer.world_size > 1
            with self.trainer.strategy.block_backward_sync() if no_sync else contextlib.nullcontext():
                self.manual_backward(loss)
            mf = m.float()
            sums["loss"] += float(loss.detach())
            sums["kl"] += float((kl.detach() * mf).sum())
            sums["clip_low"] += float((clip_low.float() * mf).sum())
            sums["clip_high"] += float((clip_high.float() * mf).sum())
            sums["ratio"] += float((torch.exp(logps.detach() - old) * mf).sum())
            sums["entropy"] += float((entropy * mf).sum())
        params = [p for p in self.policy.parameters() if p.grad is not None]
        max_norm = g.max_grad_norm if g.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).detach()  # before clipping
        grad_norm = whole(grad_norm).cpu()  # FSDP2: a DTensor (Lightning cannot all-reduce it)
        if torch.isfinite(grad_norm) and math.isfinite(sums["loss"]):
            opt.step()
            sched.step()
            self.policy_version += 1
        else:  # a NaN/inf update would destroy the adapter: skip it and count it
            self.nonfinite_steps += 1
            opt.zero_grad()
            if self.nonfinite_steps > g.max_nonfinite_updates:
                raise RuntimeError(
                    f"{self.nonfinite_steps} updates had a NaN/inf loss or gradient (more than "
                    f"model.grpo.max_nonfinite_updates={g.max_nonfinite_updates}); lower model.optim.lr, use "
                    "model.dtype float32 or bfloat16 instead of float16, or check the rewards for NaN"
                )
        tok = max(num_tokens, 1)
        stats = GRPOStats(
            loss=torch.tensor(sums["loss"]),
            kl=torch.tensor(sums["kl"] / tok),
            clip_low=torch.tensor(sums["clip_low"] / tok),
            clip_high=torch.tensor(sums["clip_high"] / tok),
            ratio_mean=torch.tensor(sums["ratio"] / tok),
        )
        extra = {"entropy": torch.tensor(sums["entropy"] / tok)}
        if rollouts.engine_logprobs is not None:
            extra["engine/logprob_diff_mean"] = torch.tensor(sums["mismatch"] / tok)
            extra["engine/logprob_diff_max"] = mismatch_max
            if g.tis_cap is not None:
                extra["engine/tis_weight_mean"] = torch.tensor(sums["tis"] / tok)
        return stats, grad_norm, extra

    def _log_step(
        self, rollouts, scores, advantages, stats, grad_norm, extra, t_rollout, t_reward, t0
    ) -> None:
        lengths = rollouts.completion_mask.sum(-1).float()  # [N]
        metrics: dict[str, Any] = {
            "train/reward": scores.total.mean(),
            "train/reward_std": scores.total.std() if scores.total.numel() > 1 else torch.tensor(0.0),
            "train/advantage_mean": advantages.mean(),
            "train/advantage_std": advantages.std() if advantages.numel() > 1 else torch.tensor(0.0),
            "train/loss": stats.loss,
            "train/kl": stats.kl,
            "train/clip_low": stats.clip_low,
            "train/clip_high": stats.clip_high,
            "train/ratio_mean": stats.ratio_mean,
            "train/entropy": extra.pop("entropy"),
            "train/completion_length_mean": lengths.mean(),
            "train/completion_length_max": lengths.max(),
            "train/truncation_rate": rollouts.truncated.float().mean(),
            "train/grad_norm": grad_norm,
            "train/nonfinite_skipped": torch.tensor(float(self.nonfinite_steps)),
            "train/lr": torch.tensor(self.lr_schedulers().get_last_lr()[0]),
            "perf/rollout_s": torch.tensor(t_rollout),
            "perf/reward_s": torch.tensor(t_reward),
            "perf/train_s": torch.tensor(time.perf_counter() - t0 - t_rollout - t_reward),
        }
        metrics.update(self.rewards.metrics(scores))  # per function: mean, None fraction; checker timeouts
        metrics.update(extra)
        sync = self.trainer.world_size > 1
        maxima = {
            k: metrics.pop(k)
            for k in ("train/completion_length_max", "engine/logprob_diff_max")
            if k in metrics
        }
        self.log_dict(_floats(metrics), on_step=True, sync_dist=sync)  # means over ranks
        self.log_dict(_floats(maxima), on_step=True, sync_dist=sync, reduce_fx="max")
        datamodule = getattr(self._trainer, "datamodule", None)
        skipped = {f"data/skipped_{k}": v for k, v in getattr(datamodule, "skipped", {}).items()}
        # rank 0's own counts: ranks meet different bad rows, and a synced log needs the same keys on every rank
        self.log_dict(_floats(skipped), on_step=True, rank_zero_only=True)
        self.log("reward", scores.total.mean(), prog_bar=True, on_step=True, logger=False, sync_dist=sync)

    # ---- checkpoints ---------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable weights (the adapter): the frozen base is reloaded from `model`, not stored again."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["policy_version"] = self.policy_version
        checkpoint["nonfinite_steps"] = self.nonfinite_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another base model or adapter shape with a message naming the setting."""
        saved = checkpoint.get("hyper_parameters", {})
        saved_lora = saved.get("lora", {})
        checks = [
            ("model.model", saved.get("model"), self.model_name),
            ("model.lora.enabled", saved_lora.get("enabled"), self.lora.enabled),
            ("model.lora.r", saved_lora.get("r"), self.lora.r),
            ("model.lora.target_modules", saved_lora.get("target_modules"), list(self.lora.target_modules)),
        ]
        for key, theirs, mine in checks:
            if theirs is not None and theirs != mine:
                raise ValueError(
                    f"the checkpoint was trained with {key}={theirs!r} but this run has {key}={mine!r}; "
                    f"set {key} to {theirs!r} to resume it, or start a new run without --ckpt_path"
                )
        self.policy_version = int(checkpoint.get("policy_version", 0))
        self.nonfinite_steps = int(checkpoint.get("nonfinite_steps", 0))
        if "state_dict" not in checkpoint:
            # ModelParallelStrategy (FSDP2) loads the weights itself and removes them before this hook (with
            # strict=False, so a checkpoint without the adapter is not caught there)
            return
        weights = checkpoint["state_dict"]
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if name not in weights:
                raise ValueError(
                    f"the checkpoint has no weights for {name}: it is not a checkpoint of this adapter"
                )
            if tuple(weights[name].shape) != tuple(param.shape):
                raise ValueError(
                    f"checkpoint weight {name} has shape {tuple(weights[name].shape)}, this model {tuple(param.shape)}"
                )

    # ---- optimizer -----------------------------------------------------------------------------------------------

    def configure_optimizers(self):
        policy = self._require_policy()
        params = [p for p in policy.parameters() if p.requires_grad]
        opt, sched = build_optimizer(params, self.optim, self._total_optimizer_steps())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _total_optimizer_steps(self) -> int:
        if self.optim.schedule_steps is not None:
            if self.optim.schedule_steps < 1:
                raise ValueError(f"model.optim.schedule_steps={self.optim.schedule_steps} must be at least 1")
            return self.optim.schedule_steps
        trainer = self._trainer
        if trainer is None:
            return 1
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        est = trainer.estimated_stepping_batches
        if not math.isfinite(est):
            raise ValueError(
                "set trainer.max_steps: the prompt stream is endless, so the schedule needs a length"
            )
        return int(est) * self.grpo.num_iterations

    # ---- evaluation (validate / test) ----------------------------------------------------------------------------

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: PromptBatch, stage: str) -> None:
        from lightning_tina.checker import check_many
        from lightning_tina.rollout.base import SamplingConfig
        from lightning_tina.rollout.batch import decode_completion

        if self.rollout is None:
            raise RuntimeError(
                "validate/test need lightning_tina.callbacks.RolloutCallback (the `rollout:` section)"
            )
        s = self.eval_settings
        sampling = SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p)
        gens = self.rollout.sample(batch.prompt_ids, s.k, sampling, self)
        texts = [decode_completion(self.tokenizer, g.token_ids) for g in gens]
        golds = [batch.rows[i // s.k]["solution"] for i in range(len(gens))]
        verdicts = check_many(
            texts, golds, "latex"
        )  # the accuracy reward's grading (golds are `$...$` or LaTeX)
        correct = torch.tensor([v.correct for v in verdicts], dtype=torch.float32)
        per_problem = correct.view(-1, s.k).mean(1)  # [B]
        self.log(f"{stage}/pass@1", per_problem.mean(), batch_size=len(batch.rows), prog_bar=True)
        self.log(f"{stage}/pass@{s.k}", (per_problem > 0).float().mean(), batch_size=len(batch.rows))


def _floats(metrics: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in metrics.items()}


def _to_device(r: Rollouts, device: torch.device) -> Rollouts:
    return r._replace(
        input_ids=r.input_ids.to(device),
        attention_mask=r.attention_mask.to(device),
        completion_mask=r.completion_mask.to(device),
        engine_logprobs=r.engine_logprobs.to(device) if r.engine_logprobs is not None else None,
    )
