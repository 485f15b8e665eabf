"""The batches and statistics that flow between the steps of GRPO.

Shapes use B = prompts per step, G = completions per prompt (the group size), N = B*G completions,
P = longest prompt, C = longest completion, V = vocabulary size.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch

FinishReason = Literal["stop", "length"]


class PromptBatch(NamedTuple):
    """What the DataModule yields for one optimizer step: B prompts and their dataset rows."""

    prompt_ids: list[list[int]]  # B lists of prompt token ids, unpadded, chat template applied
    rows: list[dict[str, Any]]  # B normalized dataset rows: at least "problem" and "solution"
    position: dict[str, int] | None = None  # the stream position right after this batch (for exact resume)


class Generation(NamedTuple):
    """One sampled completion, as a rollout engine returns it."""

    token_ids: list[int]  # completion token ids, ending with EOS when finish_reason == "stop"
    logprobs: list[float] | None  # the engine's log-prob of each sampled token, None if it gives none
    finish_reason: FinishReason  # "length" when max_new_tokens cut it off


class Rollouts(NamedTuple):
    """The padded tensors of N = B*G completions, group-major (prompt i owns rows i*G .. i*G+G-1)."""

    input_ids: torch.Tensor  # [N, P+C] left-padded prompt, right-padded completion
    attention_mask: torch.Tensor  # [N, P+C] 1 on real tokens
    completion_mask: torch.Tensor  # [N, C] 1 on completion tokens (up to and including EOS)
    completions: list[str]  # N decoded completions (special tokens removed)
    rows: list[dict[str, Any]]  # N dataset rows (each prompt's row repeated G times)
    truncated: torch.Tensor  # [N] bool, True where max_new_tokens cut the completion
    engine_logprobs: torch.Tensor | None  # [N, C] the engine's log-probs of sampled tokens (0 on padding)


class LossStats(NamedTuple):
    """What the loss of one micro-batch returns besides the loss: sums over its completion tokens (divide by the
    step's token count for means), detached Python floats. Steps add them up with `LossStats.total`."""

    loss: float  # this micro-batch's share of the step loss
    kl: float  # k3 KL to the reference
    clip_low: float  # tokens clipped at 1 - epsilon_low (negative advantage)
    clip_high: float  # tokens clipped at 1 + epsilon_high (positive advantage)
    ratio: float  # importance ratio pi / pi_old
    entropy: float  # policy entropy
    logprob_diff: float  # |trainer - engine| log-prob (0 without engine log-probs)
    logprob_diff_max: float  # the largest |trainer - engine| log-prob: a maximum, not a sum
    tis_weight: float  # truncated importance weight (0 without tis_cap)

    @staticmethod
    def total(parts: list[LossStats]) -> LossStats:
        """Sums over micro-batches, in order (the maximum for logprob_diff_max)."""
        sums = [0.0] * len(LossStats._fields)
        for part in parts:
            sums = [a + b for a, b in zip(sums, part, strict=True)]
        sums[LossStats._fields.index("logprob_diff_max")] = max(
            (p.logprob_diff_max for p in parts), default=0.0
        )
        return LossStats(*sums)


class GRPOStats(NamedTuple):
    """Per-step statistics of the GRPO update: token means over the step's completion tokens, detached floats."""

    loss: float
    kl: float  # mean k3 KL to the reference
    clip_low: float  # fraction of tokens clipped at 1 - epsilon_low (negative advantage)
    clip_high: float  # fraction of tokens clipped at 1 + epsilon_high (positive advantage)
    ratio_mean: float  # mean importance ratio pi / pi_old
    entropy: float  # mean policy entropy
    grad_norm: float  # global gradient norm before clipping
    logprob_diff_mean: float | None  # engine vs trainer log-probs; None without engine log-probs
    logprob_diff_max: float | None
    tis_weight_mean: float | None  # None without tis_cap


class StepTimes(NamedTuple):
    """Wall seconds of the phases of one training step."""

    rollout_s: float
    reward_s: float
    train_s: float
