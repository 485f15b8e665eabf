"""GRPOModule: the LoRA policy, its reference, and one GRPO update per training step.

training_step reads top to bottom as the data flow:
prompts (the batch) -> rollouts (the connected RolloutSource) -> rewards -> advantages -> loss -> optimizer step.

The module gets completions through one typed seam, `RolloutSource` (lightning_tina/rollout/base.py), connected by
RolloutCallback (an engine) or by a test/harness (`ReplayRollouts`); it offers a source only its public surface
(`PolicyHandle`: tokenizer, `engine_spec()`, `current_policy()`).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import lightning as L
import torch

from lightning_tina import grpo as objective
from lightning_tina import packing, patches
from lightning_tina.attention import CPU_ATTENTION
from lightning_tina.dynamic_sampling import DynamicStats, Scored, fill_informative
from lightning_tina.dynamic_sampling import take as take_groups
from lightning_tina.evaluate import DATASET_GRADING, sample_and_grade
from lightning_tina.grpo import GRPOSettings
from lightning_tina.logprobs import completion_logprobs
from lightning_tina.optim import OptimSettings, build_optimizer
from lightning_tina.paths import check_model_path
from lightning_tina.policy import (
    LoRASettings,
    causal_lm,
    frozen_reference,
    load_causal_lm,
    load_tokenizer,
    reference_mode,
    shard_fsdp2,
    whole,
    wrap_lora,
)
from lightning_tina.population import (
    AdapterSettings,
    Member,
    activate,
    adapter_major,
    adapter_parameters,
    build_adapters,
    comparison_layout,
    members_hparams,
    resolve_population,
)
from lightning_tina.rewards import RewardOutput, RewardSet, RewardSpec
from lightning_tina.rollout.base import (
    EngineSpec,
    PolicyHandle,
    RolloutSource,
    Sampler,
    SamplingConfig,
    with_adapters,
)
from lightning_tina.rollout.batch import (
    completion_token_ids,
    group_length_order,
    order_groups_by_length,
    row_block,
)
from lightning_tina.types import Generation, GRPOStats, LossStats, PromptBatch, Rollouts, StepTimes


def _default_rewards() -> list[RewardSpec]:
    return [RewardSpec(name="accuracy", weight=1.0), RewardSpec(name="format", weight=1.0)]


@dataclass
class EvalSettings:
    """How `validate`/`test` score the policy on the DataModule's held-out prompts.

    Args:
        k: samples per problem; pass@1 is their mean.
        temperature: sampling temperature (Tina's evaluation: 0.6).
        top_p: nucleus mass (Tina's evaluation: 0.95).
        max_new_tokens: longest completion.
    """

    k: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"model.eval.k={self.k} must be >= 1 (samples per problem)")
        try:
            self.sampling()
        except ValueError as err:  # SamplingConfig's message, with this section's key
            raise ValueError(str(err).replace("sampling.", "model.eval.", 1)) from None

    def sampling(self) -> SamplingConfig:
        """These settings as a SamplingConfig."""
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p
        )


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
        population: several adapters trained together on the one base and the same prompts (a whole ablation in
            one job; lightning_tina/population.py): a list of {name, lora, optim, seed}, `lora`/`optim` overriding
            the sections above for that adapter. None: one adapter (a solo run).
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
        population: list[AdapterSettings] | None = None,
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
        self.rewards = RewardSet(self.reward_specs)
        self.members: list[Member] = resolve_population(population, self.lora, self.optim)
        if len(self.members) > 1 and self.grpo.dynamic_sampling:
            raise ValueError(
                "model.grpo.dynamic_sampling refills each adapter with different prompts, which would break a "
                "population's shared prompt stream: set it false, or run the adapters as solo runs"
            )
        self.tokenizer = load_tokenizer(check_model_path(model, "model.model"))
        self.automatic_optimization = False  # GRPO may take several optimizer steps per rollout batch
        self.strict_loading = False  # checkpoints hold only the trainable (adapter) weights
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None  # only without LoRA
        self.rollout_source: RolloutSource | None = None  # see connect_rollouts
        self.policy_version = 0  # bumped after every optimizer step; engines resync on change
        self.nonfinite = {m.name: 0 for m in self.members}  # updates skipped for a NaN/inf loss or gradient
        self._member_params: list[list[torch.nn.Parameter]] = []  # per member, set by configure_optimizers
        hparams = {
            "model": model,
            "lora": asdict(self.lora),
            "grpo": asdict(self.grpo),
            "optim": asdict(self.optim),
            "rewards": [asdict(r) for r in self.reward_specs],
            "dtype": dtype,
        }
        population_hparams = members_hparams(self.members)
        if population_hparams is not None:
            hparams["population"] = population_hparams
        self.save_hyperparameters(hparams)

    @property
    def nonfinite_steps(self) -> int:
        """Updates skipped because the loss or gradient was NaN/inf (all adapters)."""
        return sum(self.nonfinite.values())

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The population's adapter names in order; () for a solo run."""
        return () if self.members[0].tag is None else tuple(m.name for m in self.members)

    # ---- the rollout seam (PolicyHandle for the source) ------------------------------------------------------------

    def connect_rollouts(self, source: RolloutSource) -> None:
        """Take completions from `source` from now on (RolloutCallback does this in its setup; tests and parity
        harnesses connect a `ReplayRollouts`)."""
        self.rollout_source = source

    def _source(self, stage: str) -> RolloutSource:
        if self.rollout_source is None:
            raise RuntimeError(
                f"GRPOModule {stage} needs a rollout source: add lightning_tina.callbacks.RolloutCallback to the "
                "trainer's callbacks (the CLI adds it as the `rollout:` section) or call connect_rollouts"
            )
        return self.rollout_source

    def sampler(self) -> Sampler:
        """A Sampler of the current policy through the connected source (validate/test and BenchmarkEval)."""
        return _BoundSampler(self._source("evaluation"), self)

    def engine_spec(self) -> EngineSpec:
        """Base model, dtype, largest adapter rank and the population's adapters: what an engine needs to serve this
        policy."""
        rank = max(m.lora.r for m in self.members)
        return EngineSpec(self.model_name, self.dtype_name, rank, self.adapter_names)

    def current_policy(self) -> tuple[torch.nn.Module, int]:
        """The live policy (loaded on first use) and its version, bumped after every optimizer step."""
        return self._require_policy(), self.policy_version

    # ---- model ---------------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Load the base model and wrap it (called by the Trainer; idempotent)."""
        if self.policy is not None:
            return
        attn = patches.attention_implementation(self.attn_implementation)  # CPU default: lightning_tina's own
        base = load_causal_lm(self.model_name, self.dtype_name, attn)
        if self.fused_norm:
            patches.fused_rms_norm(base)
        if self.grpo.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.config.use_cache = False
        if self.adapter_names:
            self.policy = build_adapters(base, self.members)
        elif self.lora.enabled:
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
        packed: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs and entropies of the last `completion_len` tokens of each sequence: ([n, C], [n, C] or None
        without `with_entropy`). `packed` (default: as micro_batch_tokens decides for these rows): the rows (one
        pass of `_micro_batches`) run packed into one row without padding, each run of rows with one prompt
        sharing it when `share_prompt` is on."""
        s = self.grpo
        if packed is None:
            packed = self._token_budget(attention_mask, completion_len) is not None
        if packed:
            groups = packing.prompt_runs(input_ids, attention_mask, completion_len)
            if not s.share_prompt:
                groups = [[r] for rows in groups for r in rows]
            return packing.packed_logprobs(
                model, input_ids, attention_mask, completion_len, groups, share_prompt=s.share_prompt,
                temperature=s.logprob_temp, chunk_tokens=s.logprob_chunk_tokens, with_entropy=with_entropy,
            )  # fmt: skip
        return completion_logprobs(
            model, input_ids, attention_mask, completion_len, with_entropy=with_entropy,
            group_size=s.num_generations, temperature=s.logprob_temp, chunk_tokens=s.logprob_chunk_tokens,
            share_prompt=s.share_prompt, trim_padding=s.trim_padding,
        )  # fmt: skip

    @torch.no_grad()
    def _frozen_logprobs(self, rollouts: Rollouts, reference: bool) -> torch.Tensor:
        """Log-probs without gradient, in eval mode, for the reference or the rollout-time (old) policy: [N, C]."""
        policy = self._require_policy()
        c = rollouts.completion_mask.shape[1]
        out = torch.zeros(rollouts.completion_mask.shape, device=rollouts.input_ids.device)  # [N, C]
        was_training = policy.training
        policy.eval()
        try:
            for sl in self._micro_batches(rollouts):
                ids, am = rollouts.input_ids[sl], rollouts.attention_mask[sl]
                packed = isinstance(sl, torch.Tensor)  # the rows of a packed pass
                if reference:
                    with reference_mode(policy, self.reference) as ref:
                        out[sl] = self.sequence_logprobs(ref, ids, am, c, False, packed)[0]
                else:
                    out[sl] = self.sequence_logprobs(policy, ids, am, c, False, packed)[0]
        finally:
            policy.train(was_training)
        return out  # [N, C]

    def ordered_for_micro_batches(self, rollouts: Rollouts) -> Rollouts:
        """With several groups per micro-batch (and trim_padding), whole groups ordered by their longest completion:
        similar lengths then share a micro-batch, so trimming its padding removes more. Otherwise unchanged."""
        if self._orders_groups(rollouts.input_ids.shape[0]):
            return order_groups_by_length(rollouts, self.grpo.num_generations)
        return rollouts

    def _orders_groups(self, n: int) -> bool:
        """Whether `ordered_for_micro_batches` reorders a step of n rows."""
        s = self.grpo
        return s.trim_padding and s.num_generations < s.micro_batch_size < n

    def _micro_batches(self, rollouts: Rollouts) -> list[slice | torch.Tensor]:
        """The rows of each forward/backward pass: slices of micro_batch_size rows, or with micro_batch_tokens the
        row indices [n'] of each packed pass (whole groups when prompts are shared; `packing.plan_passes`)."""
        n, mb = rollouts.input_ids.shape[0], self.grpo.micro_batch_size
        budget = self._token_budget(rollouts.attention_mask, rollouts.completion_mask.shape[1])
        if budget is None:
            return [slice(i, min(i + mb, n)) for i in range(0, n, mb)]
        return [
            torch.tensor(packing.flat_rows(p), device=rollouts.input_ids.device)
            for p in self._passes(rollouts, budget)
        ]

    def _passes(self, rollouts: Rollouts, budget: int) -> list[packing.Pass]:
        """Packed passes up to micro_batch_tokens tokens. Under FSDP2 every rank runs as many passes as the rank
        with the most (each forward gathers the weights collectively); under DDP ranks may differ, since only each
        rank's last backward all-reduces (see _optimizer_step)."""
        s, c = self.grpo, rollouts.completion_mask.shape[1]
        prompt_lens, comp_lens = packing.sequence_lengths(rollouts.attention_mask, c)
        shared = s.share_prompt and packing.shared_groups(
            rollouts.input_ids, rollouts.attention_mask, c, s.num_generations
        )
        g = s.num_generations if shared else 1
        passes = packing.plan_passes(prompt_lens, comp_lens, budget, g)
        if self.device_mesh is not None and torch.distributed.is_initialized():
            k = torch.tensor(len(passes), device=rollouts.input_ids.device)
            torch.distributed.all_reduce(k, op=torch.distributed.ReduceOp.MAX)
            passes = packing.plan_passes(prompt_lens, comp_lens, budget, g, min_passes=int(k))
        return passes

    def _token_budget(self, attention_mask: torch.Tensor, completion_len: int) -> int | None:
        """Tokens per packed pass of these rows [n, P+C], or None for count-based micro-batches (see
        GRPOSettings.micro_batch_tokens: "auto" packs with lightning_tina's CPU attention when the count-based
        passes would compute enough padding, within the tokens of a padded micro-batch [mb, P+C] and at most
        packing.AUTO_MAX_TOKENS)."""
        s = self.grpo
        if s.micro_batch_tokens != "auto":
            return s.micro_batch_tokens
        if causal_lm(self._require_policy()).config._attn_implementation != CPU_ATTENTION:
            return None
        if not packing.worth_packing(attention_mask, completion_len, s.micro_batch_size, s.trim_padding):
            return None
        return min(s.micro_batch_size * attention_mask.shape[1], packing.AUTO_MAX_TOKENS)

    def _bnpo_weights(self, mask: torch.Tensor) -> torch.Tensor:
        """[N] per row: rows / completion tokens of its count-based micro-batch (micro_batch_size rows), so that
        bnpo's per-micro-batch token mean is the same whatever rows a packed pass holds."""
        n, mb = mask.shape[0], self.grpo.micro_batch_size
        weights = torch.empty(n, device=mask.device)  # [N]
        for i in range(0, n, mb):
            rows = mask[i : i + mb]  # [mb', C]
            weights[i : i + mb] = rows.shape[0] / rows.sum().clamp(min=1).float()
        return weights

    # ---- training ------------------------------------------------------------------------------------------------

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """Rollouts of every adapter in one call, then each adapter's GRPO update on its own rows (one adapter in
        a solo run)."""
        t0 = time.perf_counter()
        scored, dynamic, t_reward = self._scored_rollouts(batch)  # per member: scores [N, F], [N]
        t_rollout = time.perf_counter() - t0 - t_reward
        for k, (member, out) in enumerate(zip(self.members, scored, strict=True)):
            advantages, stats = self._update(k, out.rollouts, out.scores)
            self._log_step(k, out.rollouts, out.scores, advantages, stats)
            self._log_options(member, out.rollouts, dynamic)
        train_s = time.perf_counter() - t0 - t_rollout - t_reward
        self._log_perf(StepTimes(t_rollout, t_reward, train_s))
        reward = torch.cat([out.scores.total for out in scored]).mean()
        self.log(
            "reward", reward, prog_bar=True, on_step=True, logger=False, sync_dist=self.trainer.world_size > 1
        )

    def _update(self, k: int, rollouts: Rollouts, scores: RewardOutput) -> tuple[torch.Tensor, GRPOStats]:
        """Member k's GRPO update on its rollouts: advantages [N], reference and old-policy log-probs, then
        num_iterations optimizer steps of its optimizer."""
        s = self.grpo
        if self.adapter_names:
            activate(self.policy, self.members[k].name)
        advantages = objective.group_advantages(
            scores.total.to(self.device), s.num_generations, s.scale_rewards
        )  # [N]
        ref_logps = self._frozen_logprobs(rollouts, reference=True) if s.beta > 0 else None  # [N, C]
        old_logps = self._frozen_logprobs(rollouts, reference=False) if s.num_iterations > 1 else None
        for _ in range(s.num_iterations):
            stats = self._optimizer_step(rollouts, advantages, ref_logps, old_logps, k)
        return advantages, stats

    def _scored_rollouts(self, batch: PromptBatch) -> tuple[list[Scored], DynamicStats | None, float]:
        """Each member's rollouts of the step (ordered for micro-batches) and their rewards, what dynamic sampling
        did (None when off) and the seconds spent in rewards. A population samples every adapter in one call: the
        batch's prompts repeated adapter-major, each adapter's rows then scored and trained apart. With
        model.grpo.dynamic_sampling (one adapter), groups with all-equal rewards are replaced by groups of fresh
        prompts from the DataModule's stream (lightning_tina/dynamic_sampling.py)."""
        s, source, reward_s = self.grpo, self._source("training"), [0.0]

        def score(r: Rollouts) -> Scored:
            t = time.perf_counter()
            ids = {"completion_ids": completion_token_ids(r)}
            out = Scored(
                r, self.rewards(r.completions, r.rows, group_size=s.num_generations, extra_columns=ids)
            )
            reward_s[0] += time.perf_counter() - t
            return out

        def scored(prompts: PromptBatch, order: bool) -> list[Scored]:
            names, k = self.adapter_names, len(self.members)
            if names:
                names = adapter_major(names, len(prompts.prompt_ids))
                prompts = PromptBatch(prompts.prompt_ids * k, prompts.rows * k, prompts.position)
            r = _to_device(with_adapters(source.rollouts, prompts, self, adapters=names or None), self.device)
            n = r.input_ids.shape[0] // k
            blocks = [row_block(r, i * n, (i + 1) * n) for i in range(k)] if k > 1 else [r]
            return [score(self.ordered_for_micro_batches(b) if order else b) for b in blocks]

        if not s.dynamic_sampling:
            return scored(batch, order=True), None, reward_s[0]
        refill = getattr(getattr(self._trainer, "datamodule", None), "refill", None)
        if refill is None:
            raise ValueError(
                "model.grpo.dynamic_sampling draws fresh prompts from lightning_tina's ReasoningDataModule (the "
                "`data:` section); this trainer has no such DataModule: set model.grpo.dynamic_sampling: false"
            )
        g, pad = s.num_generations, self.tokenizer.pad_token_id
        first = scored(batch, order=False)[0]  # one member: __init__ refuses dynamic sampling for more
        out, stats = fill_informative(
            first, lambda k: scored(refill(k), False)[0], len(batch.prompt_ids), g, s.max_refill_rounds, pad,
            self._sync_max,
        )  # fmt: skip
        if self._orders_groups(len(out.rollouts.rows)):  # as ordered_for_micro_batches, rewards alike
            groups = group_length_order(out.rollouts.completion_mask, g)[::g] // g  # [B]
            out = take_groups(out, groups, g)
        return [out], stats, reward_s[0]

    def _sync_max(self, x: int) -> int:
        """The maximum of x over the ranks (dynamic sampling's refill size): every rank draws alike."""
        if self._trainer is None or self.trainer.world_size == 1:
            return x
        t = torch.tensor(x, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t)

    def _log_options(self, member: Member, rollouts: Rollouts, dynamic: DynamicStats | None) -> None:
        """Rollout tokens of the step, truncated completions masked out of the loss, what dynamic sampling did
        (a member's own tags)."""
        s = self.grpo
        tokens = dynamic.rollout_tokens if dynamic is not None else int(rollouts.completion_mask.sum())
        metrics: dict[str, Any] = {"train/rollout_tokens": tokens}
        if s.mask_truncated_completions:
            metrics["train/truncated_masked"] = int(rollouts.truncated.sum())
        if dynamic is not None:
            metrics.update({f"dynamic/{k}": v for k, v in dynamic._asdict().items()})
            metrics["dynamic/rollout_tokens_per_kept_group"] = tokens / max(dynamic.groups_kept, 1)
        tagged = {member.metric(k): v for k, v in metrics.items()}
        self.log_dict(_floats(tagged), on_step=True, sync_dist=self.trainer.world_size > 1)

    def _micro_batch_loss(
        self,
        rollouts: Rollouts,
        sl: slice | torch.Tensor,
        advantages: torch.Tensor,
        ref_logps: torch.Tensor | None,
        old_logps: torch.Tensor | None,
        num_tokens: int,
    ) -> tuple[torch.Tensor, LossStats]:
        """The loss of rows `sl` (their share of the step loss) and its statistics (sums over their tokens)."""
        s = self.grpo
        mask = rollouts.completion_mask  # [N, C]
        n, c = mask.shape
        full = objective.loss_mask(mask, rollouts.truncated, s.mask_truncated_completions)  # [N, C]
        m = full[sl]  # [n', C]
        logps, entropy = self.sequence_logprobs(
            self.policy,
            rollouts.input_ids[sl],
            rollouts.attention_mask[sl],
            c,
            packed=isinstance(sl, torch.Tensor),
        )  # [n', C] each
        assert entropy is not None  # with_entropy is on by default
        old = old_logps[sl] if old_logps is not None else logps.detach()  # [n', C]
        per_token, clip_low, clip_high = self._surrogate(logps, old, advantages[sl], m)  # [n', C] each
        diff_sum = diff_max = tis_sum = 0.0
        if rollouts.engine_logprobs is not None:
            diff = (logps.detach() - rollouts.engine_logprobs[sl]).abs() * m  # [n', C]
            diff_sum, diff_max = float(diff.sum()), float(diff.max())
            if s.tis_cap is not None:
                w = objective.truncated_importance_weights(logps, rollouts.engine_logprobs[sl], s.tis_cap)
                per_token = per_token * w
                tis_sum = float((w * m).sum())
        kl = torch.zeros_like(logps)  # [n', C]
        if ref_logps is not None:
            kl = objective.k3_kl(logps, ref_logps[sl])
            per_token = per_token + s.beta * kl
        budget = self.rollout_source.max_new_tokens if self.rollout_source is not None else c
        bnpo_weights = None
        if isinstance(sl, torch.Tensor) and s.loss_type == "bnpo":  # a packed pass: count-based token means
            bnpo_weights = self._bnpo_weights(full)[sl]  # [n']
        loss = objective.aggregate_loss(
            per_token, m, s.loss_type, num_sequences=n, num_tokens=num_tokens, max_completion_length=budget,
            bnpo_weights=bnpo_weights,
        )  # fmt: skip
        mf = m.float()
        stats = LossStats(
            loss=float(loss.detach()),
            kl=float((kl.detach() * mf).sum()),
            clip_low=float((clip_low.float() * mf).sum()),
            clip_high=float((clip_high.float() * mf).sum()),
            ratio=float((torch.exp(logps.detach() - old) * mf).sum()),
            entropy=float((entropy * mf).sum()),
            logprob_diff=diff_sum,
            logprob_diff_max=diff_max,
            tis_weight=tis_sum,
        )
        return loss, stats

    def _surrogate(
        self, logps: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The per-token policy loss [n', C] and clip flags that model.grpo selects: PPO's token-level clip (Tina),
        GSPO's sequence-level clip (importance_sampling_level: sequence) or CISPO (policy_loss: cispo)."""
        s = self.grpo
        if s.policy_loss == "cispo":
            return objective.cispo_surrogate(logps, old, advantages, s.epsilon_high)
        if s.importance_sampling_level == "sequence":
            return objective.sequence_clipped_surrogate(
                logps, old, advantages, mask=mask, epsilon_low=s.epsilon_low, epsilon_high=s.epsilon_high
            )
        return objective.clipped_surrogate(logps, old, advantages, s.epsilon_low, s.epsilon_high)

    def _optimizer_step(
        self,
        rollouts: Rollouts,
        advantages: torch.Tensor,
        ref_logps: torch.Tensor | None,
        old_logps: torch.Tensor | None,
        k: int = 0,
    ) -> GRPOStats:
        """One optimizer step of member k over all micro-batches of its rollouts: loop, backward, clip, step."""
        opt = self._optimizer(k)
        s = self.grpo
        num_tokens = int(
            objective.loss_mask(
                rollouts.completion_mask, rollouts.truncated, s.mask_truncated_completions
            ).sum()
        )
        opt.zero_grad()
        slices = self._micro_batches(rollouts)
        manual = self._reduces_gradients_itself()
        parts = []
        for i, sl in enumerate(slices):
            loss, stats = self._micro_batch_loss(rollouts, sl, advantages, ref_logps, old_logps, num_tokens)
            # DDP all-reduces gradients in backward: only in the last micro-batch's backward of the step
            no_sync = (manual or i < len(slices) - 1) and self.trainer.world_size > 1
            with self.trainer.strategy.block_backward_sync() if no_sync else contextlib.nullcontext():
                self.manual_backward(loss)
            parts.append(stats)
        if manual:
            self._mean_gradients_over_ranks(k)
        sums = LossStats.total(parts)
        grad_norm = self._clip_gradients(k)
        self._step_if_finite(k, grad_norm, sums.loss)
        return self._step_stats(sums, num_tokens, grad_norm, rollouts.engine_logprobs is not None)

    def _reduces_gradients_itself(self) -> bool:
        """A population under DDP: DDP's reducer syncs every trainable weight once per step, but each adapter's
        backward reaches only its own weights (and there are several backward passes per step). So every backward
        runs without DDP's sync and the step's adapter is averaged over the ranks by `_mean_gradients_over_ranks`.
        FSDP2 reduce-scatters each unit's gradients in every backward by itself."""
        return len(self.members) > 1 and self.device_mesh is None and self.trainer.world_size > 1

    def _mean_gradients_over_ranks(self, k: int) -> None:
        """Average member k's gradients over the ranks in one all-reduce (what DDP would have done)."""
        grads = [p.grad for p in self._member_params[k] if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])  # [sum of sizes]
        torch.distributed.all_reduce(flat)
        flat /= self.trainer.world_size
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))

    def _optimizer(self, k: int) -> Any:
        """Member k's optimizer (a solo run has one)."""
        opts = self.optimizers()
        return opts[k] if isinstance(opts, list) else opts

    def _scheduler(self, k: int) -> Any:
        """Member k's learning-rate schedule."""
        scheds = self.lr_schedulers()
        return scheds[k] if isinstance(scheds, list) else scheds

    def _clip_gradients(self, k: int = 0) -> torch.Tensor:
        """Clip member k's gradient norm to model.grpo.max_grad_norm; returns the norm before clipping."""
        owned = self._member_params[k] if self.adapter_names else self.policy.parameters()
        params = [p for p in owned if p.grad is not None]
        max_norm = self.grpo.max_grad_norm if self.grpo.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).detach()
        return whole(grad_norm).cpu()  # FSDP2: a DTensor (Lightning cannot all-reduce it)

    def _step_if_finite(self, k: int, grad_norm: torch.Tensor, loss: float) -> None:
        """Step member k's optimizer and schedule; a NaN/inf update would destroy the adapter, so it is skipped and
        counted (per adapter)."""
        opt, sched, name = self._optimizer(k), self._scheduler(k), self.members[k].name
        if torch.isfinite(grad_norm) and math.isfinite(loss):
            if k == 0:
                opt.step()
            else:  # through the strategy (precision plugin) but uncounted: global_step counts training steps
                self.trainer.strategy.optimizer_step(opt.optimizer, lambda: None)
            sched.step()
            self.policy_version += 1
            return
        self.nonfinite[name] += 1
        opt.zero_grad()
        limit = self.grpo.max_nonfinite_updates
        if self.nonfinite[name] > limit:
            which = f"adapter {name!r}: " if self.adapter_names else ""
            raise RuntimeError(
                f"{which}{self.nonfinite[name]} updates had a NaN/inf loss or gradient (more than "
                f"model.grpo.max_nonfinite_updates={limit}); lower model.optim.lr, use "
                "model.dtype float32 or bfloat16 instead of float16, or check the rewards for NaN"
            )

    def _step_stats(
        self, sums: LossStats, num_tokens: int, grad_norm: torch.Tensor, engine: bool
    ) -> GRPOStats:
        """Token means of the summed micro-batch statistics."""
        tok = max(num_tokens, 1)
        tis = engine and self.grpo.tis_cap is not None
        return GRPOStats(
            loss=sums.loss,
            kl=sums.kl / tok,
            clip_low=sums.clip_low / tok,
            clip_high=sums.clip_high / tok,
            ratio_mean=sums.ratio / tok,
            entropy=sums.entropy / tok,
            grad_norm=float(grad_norm),
            logprob_diff_mean=sums.logprob_diff / tok if engine else None,
            logprob_diff_max=sums.logprob_diff_max if engine else None,
            tis_weight_mean=sums.tis_weight / tok if tis else None,
        )

    def _log_step(
        self,
        k: int,
        rollouts: Rollouts,
        scores: RewardOutput,
        advantages: torch.Tensor,
        stats: GRPOStats,
    ) -> None:
        """Member k's step statistics under its own tags (`train/reward/<name>`; unchanged in a solo run)."""
        member = self.members[k]
        lengths = rollouts.completion_mask.sum(-1).float()  # [N]
        metrics: dict[str, Any] = {
            "train/reward": scores.total.mean(),
            "train/reward_std": _std(scores.total),
            "train/advantage_mean": advantages.mean(),
            "train/advantage_std": _std(advantages),
            "train/loss": stats.loss,
            "train/kl": stats.kl,
            "train/clip_low": stats.clip_low,
            "train/clip_high": stats.clip_high,
            "train/ratio_mean": stats.ratio_mean,
            "train/entropy": stats.entropy,
            "train/completion_length_mean": lengths.mean(),
            "train/truncation_rate": rollouts.truncated.float().mean(),
            "train/grad_norm": stats.grad_norm,
            "train/nonfinite_skipped": float(self.nonfinite[member.name]),
            "train/lr": self._scheduler(k).get_last_lr()[0],
        }
        maxima = {"train/completion_length_max": lengths.max()}
        if stats.logprob_diff_mean is not None:
            metrics["engine/logprob_diff_mean"] = stats.logprob_diff_mean
            maxima["engine/logprob_diff_max"] = stats.logprob_diff_max
        if stats.tis_weight_mean is not None:
            metrics["engine/tis_weight_mean"] = stats.tis_weight_mean
        metrics.update(self.rewards.metrics(scores))  # per function: mean, None fraction; checker timeouts
        sync = self.trainer.world_size > 1
        metrics = {member.metric(k): v for k, v in metrics.items()}
        maxima = {member.metric(k): v for k, v in maxima.items()}
        self.log_dict(_floats(metrics), on_step=True, sync_dist=sync)  # means over ranks
        self.log_dict(_floats(maxima), on_step=True, sync_dist=sync, reduce_fx="max")

    def _log_perf(self, times: StepTimes) -> None:
        """Phase times of the step (all adapters) and the DataModule's skip counts."""
        sync = self.trainer.world_size > 1
        perf = {
            "perf/rollout_s": times.rollout_s,
            "perf/reward_s": times.reward_s,
            "perf/train_s": times.train_s,
        }
        self.log_dict(_floats(perf), on_step=True, sync_dist=sync)
        datamodule = getattr(self._trainer, "datamodule", None)
        skipped = {f"data/skipped_{k}": v for k, v in getattr(datamodule, "skipped", {}).items()}
        # rank 0's own counts: ranks meet different bad rows, and a synced log needs the same keys on every rank
        self.log_dict(_floats(skipped), on_step=True, rank_zero_only=True)

    def on_train_start(self) -> None:
        """A population: one TensorBoard chart per statistic with a line per adapter (Custom Scalars)."""
        experiment = getattr(self.logger, "experiment", None)
        if self.adapter_names and self.trainer.is_global_zero and hasattr(experiment, "add_custom_scalars"):
            experiment.add_custom_scalars(comparison_layout())

    # ---- checkpoints ---------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable weights (the adapter): the frozen base is reloaded from `model`, not stored again."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["policy_version"] = self.policy_version
        checkpoint["nonfinite_steps"] = self.nonfinite_steps
        checkpoint["nonfinite_by_adapter"] = dict(self.nonfinite)

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
        checks += self._population_checks(saved.get("population"))
        for key, theirs, mine in checks:
            if theirs is not None and theirs != mine:
                raise ValueError(
                    f"the checkpoint was trained with {key}={theirs!r} but this run has {key}={mine!r}; "
                    f"set {key} to {theirs!r} to resume it, or start a new run without --ckpt_path"
                )
        self.policy_version = int(checkpoint.get("policy_version", 0))
        by_adapter = checkpoint.get("nonfinite_by_adapter")
        if by_adapter is None:  # checkpoints before populations: one adapter
            by_adapter = {self.members[0].name: int(checkpoint.get("nonfinite_steps", 0))}
        self.nonfinite = {m.name: int(by_adapter.get(m.name, 0)) for m in self.members}
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

    def _population_checks(self, saved: list[dict[str, Any]] | None) -> list[tuple[str, Any, Any]]:
        """(key, checkpoint's value, this run's value) for a population: the same adapters, ranks and targets."""
        mine = members_hparams(self.members)
        if saved is None and mine is None:
            return []

        def names(population: list[dict[str, Any]] | None) -> Any:
            return [a["name"] for a in population] if population else "null (a solo run)"

        checks = [("model.population", names(saved), names(mine))]
        if saved and mine and names(saved) == names(mine):
            for theirs, ours in zip(saved, mine, strict=True):
                for key in ("r", "target_modules"):
                    where = f"model.population[{ours['name']}].lora.{key}"
                    checks.append((where, theirs["lora"][key], ours["lora"][key]))
        return checks

    # ---- optimizer -----------------------------------------------------------------------------------------------

    def configure_optimizers(self):
        """AdamW and its schedule; a population: one pair per adapter, over that adapter's weights only."""
        policy = self._require_policy()
        if not self.adapter_names:
            params = [p for p in policy.parameters() if p.requires_grad]
            opt, sched = build_optimizer(params, self.optim, self._total_optimizer_steps(self.optim))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        self._member_params = [adapter_parameters(policy, m.name) for m in self.members]
        out = []
        for m, params in zip(self.members, self._member_params, strict=True):
            opt, sched = build_optimizer(params, m.optim, self._total_optimizer_steps(m.optim))
            out.append({"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}})
        return out

    def _total_optimizer_steps(self, optim: OptimSettings) -> int:
        if optim.schedule_steps is not None:
            return optim.schedule_steps
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

    def _grading(self) -> tuple[str, str]:
        """(gold field, checker mode) of the `accuracy` reward as configured, so that validate/test read the gold
        that training rewards; its defaults ("solution", DATASET_GRADING) without one. Grading is strict."""
        spec = next((r for r in self.reward_specs if r.name == "accuracy"), None)
        kwargs = spec.kwargs if spec is not None else {}
        return kwargs.get("gold_field", "solution"), kwargs.get("mode", DATASET_GRADING)

    def _eval_step(self, batch: PromptBatch, stage: str) -> None:
        """pass@1 and pass@k on held-out prompts, decoded and graded as `evaluate()` does, with the accuracy
        reward's gold field and mode."""
        k, m = self.eval_settings.k, len(self.members)
        gold_field, mode = self._grading()
        golds = [row[gold_field] for row in batch.rows] * m
        prompts = (
            list(batch.prompt_ids) * m
        )  # a population: every adapter's prompts in one call, adapter-major
        names = adapter_major(self.adapter_names, len(batch.prompt_ids)) or None
        sampling = self.eval_settings.sampling()
        correct = sample_and_grade(
            self.sampler(), self.tokenizer, prompts, golds, mode, k, sampling, adapters=names
        )
        per_problem = torch.tensor(correct, dtype=torch.float32).view(m, -1, k).mean(2)  # [M, B]
        for member, scores in zip(self.members, per_problem, strict=True):
            size = len(batch.rows)
            self.log(member.metric(f"{stage}/pass@1"), scores.mean(), batch_size=size, prog_bar=m == 1)
            self.log(member.metric(f"{stage}/pass@{k}"), (scores > 0).float().mean(), batch_size=size)


class _BoundSampler:
    """A RolloutSource bound to the module: the `Sampler` that `GRPOModule.sampler()` returns."""

    def __init__(self, source: RolloutSource, policy: PolicyHandle) -> None:
        self.source, self.policy = source, policy

    def generate(self, prompt_ids, n: int, sampling: SamplingConfig, adapters=None) -> list[Generation]:
        return with_adapters(self.source.generate, prompt_ids, n, sampling, self.policy, adapters=adapters)


def _std(x: torch.Tensor) -> torch.Tensor:
    return x.std() if x.numel() > 1 else torch.tensor(0.0)


def _floats(metrics: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in metrics.items()}


def _to_device(r: Rollouts, device: torch.device) -> Rollouts:
    return r._replace(
        input_ids=r.input_ids.to(device),
        attention_mask=r.attention_mask.to(device),
        completion_mask=r.completion_mask.to(device),
        engine_logprobs=r.engine_logprobs.to(device) if r.engine_logprobs is not None else None,
    )
