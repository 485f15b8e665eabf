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
    prompts: list[str]  # B rendered prompt strings (what the token ids decode to)
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

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1] - self.completion_mask.shape[1]


class GRPOStats(NamedTuple):
    """Per-step statistics of the GRPO loss, all detached scalars (token means over completion tokens)."""

    loss: torch.Tensor
    kl: torch.Tensor  # mean k3 KL to the reference
    clip_low: torch.Tensor  # fraction of tokens clipped at 1 - epsilon_low (negative advantage)
    clip_high: torch.Tensor  # fraction of tokens clipped at 1 + epsilon_high (positive advantage)
    ratio_mean: torch.Tensor  # mean importance ratio pi / pi_old
