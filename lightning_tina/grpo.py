"""GRPO as lightning_tina runs it, as pure functions: advantages, token log-probs, the clipped surrogate, KL, loss.

GRPO (Group Relative Policy Optimization) samples a group of G completions for every prompt, scores each with the
rewards, and uses the reward minus its group's mean, divided by the group's std, as the advantage of every token of
that completion: no value model. The loss is PPO's clipped surrogate on the ratio pi / pi_old plus beta times a k3
estimate of the KL to the reference model (the base model with the adapter disabled), averaged per sequence and
then over the step's sequences ("grpo", Tina's TRL). On by default: group-normalised advantages, beta 0.04,
symmetric clipping at 0.2 (inactive with one update per rollout batch, where the ratio is 1). Off by default:
several updates per rollout batch (num_iterations), clip-higher (epsilon_high), truncated importance sampling of
engine/trainer mismatch (tis_cap), the other loss aggregations and advantage scalings (loss_type,
scale_rewards), and the options of issue 18: GSPO's sequence-level ratio (importance_sampling_level), CISPO
(policy_loss), masking truncated completions out of the loss (mask_truncated_completions) and DAPO's dynamic
sampling (dynamic_sampling, lightning_tina/dynamic_sampling.py). GRPOSettings holds these switches and checks each
when it is built.

Shapes: N completions (B prompts x G generations, group-major), C completion tokens, T = prompt + completion tokens,
H hidden size, V vocabulary size. Nothing here touches a model's state or an optimizer, so every function is tested
on hand-computed values in `tests/test_grpo.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from lightning_tina.checks import check_fields

AdvantageScale = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ImportanceLevel = Literal["token", "sequence"]
PolicyLoss = Literal["clip", "cispo"]
ADVANTAGE_SCALES: tuple[str, ...] = get_args(AdvantageScale)
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
IMPORTANCE_LEVELS: tuple[str, ...] = get_args(ImportanceLevel)
POLICY_LOSSES: tuple[str, ...] = get_args(PolicyLoss)


@dataclass
class GRPOSettings:
    """The GRPO objective. Defaults are Tina's (TRL GRPO as Tina ran it):

    on: group-normalised advantages (std of the group), k3 KL to the reference with beta 0.04, symmetric clipping
    eps 0.2 (inactive with num_iterations=1, where the ratio is 1), per-sequence loss mean ("grpo").
    off: several updates per rollout (num_iterations=1), truncated importance sampling, clip-higher.
    """

    num_generations: int = 8
    """G, completions sampled per prompt (the group). Linked to the rollout callback."""
    batch_size: int = 64
    """Completions per optimizer step on each device (B * G); must be a multiple of num_generations."""
    micro_batch_size: int = 16
    """Completions per forward/backward pass; lower it to save memory (gradients are accumulated). A multiple of
    num_generations lets each prompt be computed once per group (share_prompt)."""
    beta: float = 0.04
    """Weight of the k3 KL penalty to the reference model; 0 skips the reference forward."""
    epsilon_low: float = 0.2
    """Lower clip range: the ratio is clipped at 1 - epsilon_low."""
    epsilon_high: float = 0.2
    """Upper clip range: the ratio is clipped at 1 + epsilon_high (DAPO's clip-higher uses 0.28)."""
    loss_type: LossType = "grpo"
    """Token aggregation: grpo (per-sequence mean), bnpo, dr_grpo or dapo (see grpo.aggregate_loss)."""
    scale_rewards: AdvantageScale = "group"
    """Divide centred rewards by the group std ("group"), the batch std ("batch") or not ("none", Dr. GRPO)."""
    num_iterations: int = 1
    """Optimizer steps per rollout batch (mu); above 1 the clipped ratio uses the rollout's old log-probs."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts. Linked to rollout.sampling.temperature by the CLI."""
    logprob_temperature: float | None = None
    """Temperature of the trainer's log-probs (policy, reference, old policy): log_softmax(logits / T_lp).
    None: the sampling temperature, so the ratio and KL are those of the distribution that sampled (TRL >= 0.16,
    the temperature-consistent choice). 1.0: raw logits while sampling at `temperature`, as TRL 0.15.2's
    `_get_per_token_logps` and so Tina's trainer did (configs/tina sets it; docs/recipes.md)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    max_nonfinite_updates: int = 10
    """Updates with a NaN/inf loss or gradient are skipped and counted; the run stops after this many."""
    tis_cap: float | None = None
    """Truncated importance sampling cap for engine/trainer mismatch (e.g. 2.0); None keeps Tina's semantics."""
    logprob_chunk_tokens: int = 1024
    """Tokens whose float32 logits are materialised at once when computing log-probs. Peak memory is about two
    [chunk, V] float32 tensors (forward and backward; see grpo.token_logprobs and bench/logprob_memory.py)."""
    gradient_checkpointing: bool = False
    """Recompute transformer activations in backward to save memory."""
    share_prompt: bool = True
    """Run each prompt once per group with a KV cache in the reference and policy passes instead of G times (same
    log-probs and gradients up to rounding; see lightning_tina/logprobs.py). Needs micro_batch_size to be a
    multiple of num_generations; the policy pass falls back to full sequences under gradient_checkpointing."""
    trim_padding: bool = True
    """Run each micro-batch of the reference and policy passes over its own longest prompt and completion (rounded
    up to 64 columns) instead of the step's (exact: the dropped columns are padding in every row). When a
    micro-batch holds several groups, groups are first ordered by their longest completion so that similar lengths
    share one. Off only to measure what it saves."""
    micro_batch_tokens: int | Literal["auto"] | None = "auto"
    """Fill each forward/backward pass of the reference, old-policy and policy passes with whole sequences up to
    this many tokens, packed into one row without padding (lightning_tina/packing.py), instead of
    micro_batch_size rows padded to their longest: short completions share a pass and cost what they contain, and
    the activation memory of a pass is set by this budget. Exact (same log-probs, gradients and loss
    normalisation up to rounding). With share_prompt each prompt is packed once, before its group's completions.
    null: count-based micro-batches. "auto" (default): packed where it is measured exact and faster, i.e. with
    lightning_tina's CPU attention (which computes each packed sequence on its own keys) when count-based
    micro-batches would compute padding, with the budget of a count-based micro-batch (micro_batch_size x the
    step's prompt + completion width, at most packing.AUTO_MAX_TOKENS), so memory never grows;
    count-based with other attention implementations (transformers' sdpa/eager get a [T, T] block mask; flash
    attention's packed kernels are not measured yet). bench/README.md, section "Packing: micro-batches by a
    token budget"."""
    importance_sampling_level: ImportanceLevel = "token"
    """"token": PPO's per-token ratio (GRPO, Tina). "sequence": GSPO's ratio, the geometric mean of the token ratios
    of a completion, clipped per completion (grpo.sequence_clipped_surrogate; GSPO uses epsilon 3e-4/4e-4 and
    beta 0). Like any ratio it only matters off-policy: with num_iterations=1 the ratio is 1."""
    policy_loss: PolicyLoss = "clip"
    """"clip": PPO's clipped surrogate (GRPO, Tina). "cispo": MiniMax-M1's CISPO, the detached importance weight
    min(r, 1 + epsilon_high) times A times the log-prob (grpo.cispo_surrogate): no token loses its gradient."""
    mask_truncated_completions: bool = False
    """Leave completions cut off at rollout.sampling.max_new_tokens out of the loss (their reward still enters
    their group's advantages); logged as train/truncated_masked."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: groups whose rewards are all equal (zero advantage) are dropped and replaced by
    groups of fresh prompts from the stream until the step has batch_size / num_generations informative groups,
    or max_refill_rounds extra rounds were generated (lightning_tina/dynamic_sampling.py)."""
    max_refill_rounds: int = 4
    """With dynamic_sampling: extra generation rounds per step at most; then the step trains on the informative
    groups it has, topped up with dropped groups (zero advantage) to keep its shape (train/groups_padded)."""

    def __post_init__(self) -> None:
        check_fields("model.grpo", self, self._checks())
        if self.batch_size % self.num_generations:
            g = self.num_generations
            raise ValueError(
                f"model.grpo.batch_size={self.batch_size} is not a multiple of model.grpo.num_generations={g}; "
                f"set batch_size to a multiple, e.g. {g * max(1, self.batch_size // g)}"
            )

    def _checks(self) -> list[tuple[str, bool, str]]:
        """(field, valid, what it must be): one message per field."""
        return [
            ("num_generations", self.num_generations >= 2, ">= 2: advantages compare completions of a group"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("micro_batch_size", self.micro_batch_size >= 1, ">= 1"),
            ("num_iterations", self.num_iterations >= 1, ">= 1"),
            ("beta", self.beta >= 0, ">= 0 (0 skips the reference)"),
            ("epsilon_low", 0 <= self.epsilon_low < 1, "in [0, 1)"),
            ("epsilon_high", self.epsilon_high >= 0, ">= 0"),
            ("loss_type", self.loss_type in LOSS_TYPES, f"one of {list(LOSS_TYPES)}"),
            ("scale_rewards", self.scale_rewards in ADVANTAGE_SCALES, f"one of {list(ADVANTAGE_SCALES)}"),
            ("temperature", self.temperature > 0, "> 0 (the trainer divides logits by it)"),
            (
                "logprob_temperature",
                self.logprob_temperature is None or self.logprob_temperature > 0,
                "> 0 or null",
            ),
            ("max_grad_norm", self.max_grad_norm >= 0, ">= 0 (0 disables clipping)"),
            ("max_nonfinite_updates", self.max_nonfinite_updates >= 0, ">= 0"),
            ("tis_cap", self.tis_cap is None or self.tis_cap > 0, "> 0 or null"),
            ("logprob_chunk_tokens", self.logprob_chunk_tokens >= 1, ">= 1"),
            (
                "micro_batch_tokens",
                self.micro_batch_tokens in (None, "auto")
                or (isinstance(self.micro_batch_tokens, int) and self.micro_batch_tokens >= 1),
                ">= 1 or null",
            ),
            (
                "importance_sampling_level",
                self.importance_sampling_level in IMPORTANCE_LEVELS,
                f"one of {list(IMPORTANCE_LEVELS)}",
            ),
            ("policy_loss", self.policy_loss in POLICY_LOSSES, f"one of {list(POLICY_LOSSES)}"),
            (
                "importance_sampling_level",
                not (self.importance_sampling_level == "sequence" and self.policy_loss == "cispo"),
                "'token' with model.grpo.policy_loss 'cispo' (CISPO weighs tokens)",
            ),
            ("max_refill_rounds", self.max_refill_rounds >= 0, ">= 0"),
        ]

    @property
    def logprob_temp(self) -> float:
        """The temperature the trainer's log-probs use (see logprob_temperature)."""
        return self.temperature if self.logprob_temperature is None else self.logprob_temperature


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: AdvantageScale = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages.

    A_i = (r_i - mean_g(r)) / (s + eps), with mean_g the mean over the G completions of the same prompt and
    s = std_g(r) (scale="group", GRPO), the std over the whole batch (scale="batch", as in REINFORCE++/Lite PPO),
    or s = 1 with no eps (scale="none", Dr. GRPO). Stds are unbiased (Bessel), as in TRL. A group whose rewards are
    all equal gets advantage 0. NaN rewards are not expected here: the reward sum is NaN-aware upstream.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be [N] with N a multiple of group_size={group_size}, got {tuple(rewards.shape)}"
        )
    grouped = rewards.view(-1, group_size)  # [B, G]
    centered = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)  # [N]
    if scale == "none":
        return centered
    if scale == "group":
        std = (
            grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1) if group_size > 1 else None
        )  # [N]
        if std is None:
            return torch.zeros_like(rewards)
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())  # []
    else:
        raise ValueError(f"advantage scale must be 'group', 'batch' or 'none', got {scale!r}")
    denom = std + eps  # [N] or []
    return torch.where(denom > 0, centered / denom.clamp(min=torch.finfo(centered.dtype).tiny), 0.0)


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """Logits / T of one chunk in float32 (float64 stays): [n, c, V]. The matmul runs in the autocast dtype, if any."""
    logits = F.linear(hidden, weight, bias)  # [n, c, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits.div_(temperature) if temperature != 1.0 else logits


class _ChunkLogprobs(torch.autograd.Function):
    """log softmax(h W^T + b)[y] / T and the entropy of one chunk, with a hand-written backward.

    Saves only the chunk's hidden states and log-partition (not the [n, c, V] logits): the backward recomputes the
    logits and turns them into their gradient in place, so one float32 [n, c, V] tensor is alive in the backward
    (autograd through log_softmax + gather keeps about five). The entropy is an output without gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,  # [n, c, H]
        targets: torch.Tensor,  # [n, c]
        weight: torch.Tensor,  # [V, H]
        bias: torch.Tensor | None,  # [V]
        temperature: float,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = hidden.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        logp = _chunk_logits(hidden, weight, bias, temperature)  # [n, c, V], log-probs after the next line
        logz = torch.logsumexp(logp, dim=-1)  # [n, c]
        logp.sub_(logz.unsqueeze(-1))
        token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [n, c]
        entropy = None
        if with_entropy:
            entropy = -logp.exp().mul_(logp).sum(-1)  # [n, c]
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, targets, weight, bias, logz)
        ctx.temperature = temperature
        return token_logp, entropy

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_logp: torch.Tensor, _grad_entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, None, torch.Tensor | None, torch.Tensor | None, None, None]:
        hidden, targets, weight, bias, logz = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        with torch.autocast(hidden.device.type, dtype=dtype, enabled=enabled):
            # d logp_y / d logits = onehot(y) - softmax; times the incoming gradient and 1/T
            grad = _chunk_logits(hidden, weight, bias, ctx.temperature)  # [n, c, V]
            g = grad_logp.to(grad.dtype) / ctx.temperature  # [n, c]
            grad.sub_(logz.unsqueeze(-1)).exp_().mul_(-g.unsqueeze(-1))  # -g * softmax
            grad.scatter_add_(-1, targets.unsqueeze(-1), g.unsqueeze(-1))  # + g at the target
            if not enabled:  # as autograd would: the gradient reaches the matmul in its output dtype
                grad = grad.to(torch.promote_types(hidden.dtype, weight.dtype))
            grad_hidden = grad_weight = grad_bias = None
            if ctx.needs_input_grad[0]:
                grad_hidden = F.linear(grad, weight.T).to(hidden.dtype)  # [n, c, H]
            if ctx.needs_input_grad[2]:
                flat = grad.reshape(-1, grad.shape[-1])  # [n*c, V]
                grad_weight = (flat.T @ hidden.reshape(-1, hidden.shape[-1]).to(flat.dtype)).to(
                    weight.dtype
                )  # [V, H]
            if bias is not None and ctx.needs_input_grad[3]:
                grad_bias = grad.sum((0, 1)).to(bias.dtype)  # [V]
        return grad_hidden, None, grad_weight, grad_bias, None, None


def token_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs log softmax(h W^T + b)[y] / T of `targets`, and per-token entropies, in chunks.

    `hidden` [N, C, H] are the final hidden states that predict `targets` [N, C]. The float32 logits of at most
    `chunk_tokens` tokens ([chunk, V]) exist at any moment, in the forward pass and in the backward pass (which
    recomputes them, see `_ChunkLogprobs`), instead of the full [N, C, V] tensor (Qwen's V = 151,936 and Tina's
    C = 3,584 would need 2.2 GB per sequence). Entropy, -sum p log p, is returned detached (it is only logged);
    `with_entropy=False` skips it (one pass over the logits less) and returns None in its place.
    Returns (logprobs [N, C] with grad, entropy [N, C] without, or None).
    """
    n, c, _ = hidden.shape
    rows_per_chunk = max(1, chunk_tokens // max(c, 1))  # whole rows when they fit, else pieces of one row
    cols_per_chunk = min(c, chunk_tokens)
    logps, ents = [], []
    for r0 in range(0, n, rows_per_chunk):
        row_lp, row_ent = [], []
        for c0 in range(0, c, cols_per_chunk):
            h = hidden[r0 : r0 + rows_per_chunk, c0 : c0 + cols_per_chunk]  # [n', c', H]
            y = targets[r0 : r0 + rows_per_chunk, c0 : c0 + cols_per_chunk]  # [n', c']
            lp, ent = _ChunkLogprobs.apply(h, y, head_weight, head_bias, temperature, with_entropy)
            row_lp.append(lp)
            row_ent.append(ent)
        logps.append(torch.cat(row_lp, dim=1))
        if with_entropy:
            ents.append(torch.cat(row_ent, dim=1))
    return torch.cat(logps, dim=0), torch.cat(ents, dim=0) if with_entropy else None  # [N, C], [N, C]


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
    delta = ref_logprobs - logprobs  # [N, C]
    return torch.exp(delta) - delta - 1


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate as a per-token loss to minimise.

    r = exp(logp - logp_old);  loss = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A).
    `advantages` is [N] (one per completion) or [N, C]. Returns (loss [N, C], clipped_low [N, C], clipped_high [N, C]),
    where clipped_low marks tokens whose gradient the lower bound removed (r < 1 - eps_low and A < 0) and
    clipped_high those the upper bound removed (r > 1 + eps_high and A > 0).
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # [N, 1] or [N, C]
    ratio = torch.exp(logprobs - old_logprobs)  # [N, C]
    return _ppo_clip(ratio, adv, epsilon_low, epsilon_high)  # [N, C] each


def _ppo_clip(
    ratio: torch.Tensor, adv: torch.Tensor, epsilon_low: float, epsilon_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) and the flags of the bound that removed the gradient: the
    clip shared by the token-level (one ratio per token) and the sequence-level (one per completion) surrogates."""
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)  # like ratio
    loss = -torch.min(ratio * adv, clipped * adv)  # like ratio
    return loss, (ratio < 1 - epsilon_low) & (adv < 0), (ratio > 1 + epsilon_high) & (adv > 0)


def sequence_clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GSPO's clipped surrogate on the sequence-level importance ratio, as a per-token loss to minimise.

    s_i = exp((1/|o_i|) sum_t m_it (logp_it - logp_old_it))  -- the geometric mean of the token ratios of sequence i;
    loss_it = -min(s_i * A_i, clip(s_i, 1 - eps_low, 1 + eps_high) * A_i) for every token t of sequence i.
    The gradient of s_i is s_i * (1/|o_i|) sum_t grad logp_it, so a sequence is clipped (or not) as a whole. Every
    token of a sequence carries the same loss, so the per-sequence mean ("grpo" aggregation) gives L_i itself.
    `advantages` is [N] (one per completion); `mask` (keyword) [N, C] marks completion tokens. Returns (loss [N, C],
    clipped_low [N, C], clipped_high [N, C]), the clip flags of each sequence broadcast to its tokens.
    """
    if advantages.dim() != 1:
        raise ValueError(
            f"sequence-level ratios need one advantage per completion [N], got {tuple(advantages.shape)}"
        )
    m = mask.to(logprobs.dtype)  # [N, C]
    log_ratio = ((logprobs - old_logprobs) * m).sum(-1) / m.sum(-1).clamp(min=1)  # [N]
    ratio = torch.exp(log_ratio)  # [N]
    per_sequence = _ppo_clip(ratio, advantages, epsilon_low, epsilon_high)  # loss, low, high: [N] each
    loss, clipped_low, clipped_high = (
        t.unsqueeze(-1).expand(logprobs.shape) for t in per_sequence
    )  # [N, C] each
    return loss, clipped_low, clipped_high


def cispo_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CISPO's surrogate (MiniMax-M1): the clipped importance weight, detached, times A times the log-prob.

    r = exp(logp - logp_old);  w = sg(min(r, 1 + eps_high));  loss = -w * A * logp.
    Its gradient is -w * A * grad logp for every token: unlike PPO's clip, no token loses its gradient, the weight
    is only capped. No lower bound, as MiniMax-M1 trained it. `advantages` is [N] or [N, C]. Returns (loss [N, C],
    clipped_low [N, C] (all False), clipped_high [N, C]: tokens whose weight was capped, r > 1 + eps_high).
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # [N, 1] or [N, C]
    ratio = torch.exp(logprobs.detach() - old_logprobs)  # [N, C]
    weight = ratio.clamp(max=1 + epsilon_high)  # [N, C], no gradient
    loss = -weight * adv * logprobs  # [N, C]
    clipped_high = ratio > 1 + epsilon_high  # [N, C]
    return loss, torch.zeros_like(clipped_high), clipped_high


def loss_mask(completion_mask: torch.Tensor, truncated: torch.Tensor, mask_truncated: bool) -> torch.Tensor:
    """The tokens that enter the loss: m_it = completion_mask_it * (1 - truncated_i) with `mask_truncated`, else
    completion_mask unchanged. `completion_mask` [N, C], `truncated` [N] bool; returns [N, C] of the mask's dtype.

    Masking truncated completions (DAPO's overlong filtering, TRL's mask_truncated_completions) removes a cut-off
    completion from the loss, so that it is neither rewarded nor punished for an answer it had no room to finish;
    its reward still enters its group's advantages.
    """
    if not mask_truncated:
        return completion_mask
    keep = (~truncated.to(torch.bool)).to(completion_mask.dtype).to(completion_mask.device)  # [N]
    return completion_mask * keep.unsqueeze(-1)  # [N, C]


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_type: LossType,
    *,
    num_sequences: int | None = None,
    num_tokens: int | float | None = None,
    max_completion_length: int | None = None,
    bnpo_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [n, C] of one micro-batch to the scalar whose sum over micro-batches is the step's loss.

    With m the completion mask, L_i = sum_t m_it l_it and |o_i| = sum_t m_it:
    - grpo    (Tina, TRL's original): (1/N) sum_i L_i / |o_i|  -- per-sequence mean, then mean over the N sequences
      of the whole step (`num_sequences`, default the micro-batch's n);
    - bnpo    : sum_i L_i / sum_i |o_i| over this micro-batch (a token mean per micro-batch; pass `num_sequences` to
      weight micro-batches by their share of sequences, which makes equal-sized micro-batches average); with
      `bnpo_weights` [n] (row i: n_k / sum of |o| over the count-based micro-batch k that holds it) the rows may
      come in any grouping (packed passes) and the sum over the step is still that of count-based micro-batches;
    - dr_grpo : sum_i L_i / (N * max_completion_length), the constant normaliser of Dr. GRPO;
    - dapo    : sum_i L_i / `num_tokens`, the number of completion tokens in the whole step (all micro-batches and
      ranks), so every token of the step weighs the same.
    """
    m = mask.to(per_token.dtype)  # [n, C]
    n = per_token.shape[0]
    total_seqs = num_sequences or n
    seq_sums = (per_token * m).sum(-1)  # [n]
    if loss_type == "grpo":
        return (seq_sums / m.sum(-1).clamp(min=1)).sum() / total_seqs
    if loss_type == "bnpo" and bnpo_weights is not None:
        return (seq_sums * bnpo_weights).sum() / total_seqs
    if loss_type == "bnpo":
        return seq_sums.sum() / m.sum().clamp(min=1) * (n / total_seqs)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
        return seq_sums.sum() / (total_seqs * max_completion_length)
    if loss_type == "dapo":
        if num_tokens is None:
            raise ValueError("loss_type 'dapo' needs num_tokens, the completion tokens of the whole step")
        return seq_sums.sum() / max(float(num_tokens), 1.0)
    raise ValueError(f"loss_type must be one of grpo, bnpo, dr_grpo, dapo; got {loss_type!r}")


def truncated_importance_weights(
    trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, cap: float
) -> torch.Tensor:
    """Token-level truncated importance sampling weights min(exp(logp_trainer - logp_engine), cap).

    Corrects for the rollout engine sampling from a slightly different distribution than the trainer computes
    (bf16 kernels, a different attention implementation). Detached: it reweights, it is not optimised.
    """
    return torch.exp(trainer_logprobs.detach() - engine_logprobs).clamp(max=cap)  # [N, C]
