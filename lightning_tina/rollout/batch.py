"""Turn an engine's generations into the padded tensors the loss needs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_tina.types import Generation, PromptBatch, Rollouts


def make_rollouts(
    batch: PromptBatch, generations: Sequence[Generation], group_size: int, tokenizer
) -> Rollouts:
    """Pad prompts on the left and completions on the right: [N, P + C] with N = B * G, group-major."""
    n = len(batch.prompt_ids) * group_size
    if len(generations) != n:
        raise RuntimeError(f"rollout engine returned {len(generations)} completions, expected {n}")
    pad = tokenizer.pad_token_id
    prompts = [batch.prompt_ids[i // group_size] for i in range(n)]
    p_len = max(len(p) for p in prompts)
    c_len = max(1, max(len(g.token_ids) for g in generations))
    input_ids = torch.full((n, p_len + c_len), pad, dtype=torch.long)  # [N, P+C]
    attention_mask = torch.zeros((n, p_len + c_len), dtype=torch.long)  # [N, P+C]
    completion_mask = torch.zeros((n, c_len), dtype=torch.long)  # [N, C]
    engine_lp = torch.zeros((n, c_len), dtype=torch.float32)  # [N, C]
    has_lp = all(g.logprobs is not None for g in generations)
    for i, (p, g) in enumerate(zip(prompts, generations, strict=True)):
        input_ids[i, p_len - len(p) : p_len] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, p_len - len(p) : p_len] = 1
        c = len(g.token_ids)
        if c:
            input_ids[i, p_len : p_len + c] = torch.tensor(g.token_ids, dtype=torch.long)
            attention_mask[i, p_len : p_len + c] = 1
            completion_mask[i, :c] = 1
            if has_lp:
                engine_lp[i, :c] = torch.tensor(g.logprobs, dtype=torch.float32)
    completions = [decode_completion(tokenizer, g.token_ids) for g in generations]
    return Rollouts(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        completions=completions,
        rows=[batch.rows[i // group_size] for i in range(n)],
        truncated=torch.tensor([g.finish_reason == "length" for g in generations], dtype=torch.bool),  # [N]
        engine_logprobs=engine_lp if has_lp else None,
    )


def order_groups_by_length(rollouts: Rollouts, group_size: int) -> Rollouts:
    """The same rollouts with whole groups ordered by their longest completion, longest first (a stable sort).

    Consecutive micro-batches then hold groups of similar length, so dropping each micro-batch's unused padding
    (`logprobs.trim_unused_columns`) removes more of it. Groups stay whole and every field is permuted alike; the
    loss and statistics of a step are sums over rows, so the update is the same up to summation order.
    """
    order = group_length_order(rollouts.completion_mask, group_size)  # [N]
    if torch.equal(order, torch.arange(order.numel())):
        return rollouts
    return take_rows(rollouts, order)


def group_length_order(completion_mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """Row order [N] that puts whole groups by their longest completion, longest first (stable)."""
    n = completion_mask.shape[0]
    longest = completion_mask.sum(-1).view(n // group_size, group_size).amax(-1)  # [B]
    groups = torch.sort(longest.cpu(), descending=True, stable=True).indices  # [B]
    return (groups[:, None] * group_size + torch.arange(group_size)).reshape(-1)  # [N]


def take_rows(rollouts: Rollouts, rows: torch.Tensor) -> Rollouts:
    """Rollouts of the given rows [M] (long), in that order; every tensor and list field alike."""
    idx = rows.tolist()
    fields: dict = {}
    for name, value in rollouts._asdict().items():
        if isinstance(value, torch.Tensor):
            fields[name] = value[rows.to(value.device)]
        elif isinstance(value, list):
            fields[name] = [value[i] for i in idx]
        else:
            fields[name] = value
    return Rollouts(**fields)


def row_block(rollouts: Rollouts, start: int, end: int) -> Rollouts:
    """Rows [start, end) (one population adapter's), with the completion padding that only other rows needed cut
    off: the same tensors that `make_rollouts` builds from those rows' generations alone."""
    c = max(1, int(rollouts.completion_mask[start:end].sum(-1).max()))
    cut = rollouts.completion_mask.shape[1] - c  # columns of padding beyond this block's longest completion
    width = rollouts.input_ids.shape[1] - cut

    def block(t: torch.Tensor, columns: int) -> torch.Tensor:
        return t[start:end, :columns]

    return rollouts._replace(
        input_ids=block(rollouts.input_ids, width),  # [n, P+c]
        attention_mask=block(rollouts.attention_mask, width),  # [n, P+c]
        completion_mask=block(rollouts.completion_mask, c),  # [n, c]
        completions=rollouts.completions[start:end],
        rows=rollouts.rows[start:end],
        truncated=rollouts.truncated[start:end],  # [n]
        engine_logprobs=None if rollouts.engine_logprobs is None else block(rollouts.engine_logprobs, c),
    )


def completion_token_ids(rollouts: Rollouts) -> list[list[int]]:
    """Each completion's token ids (EOS included, padding not): N lists, what `completion_mask` marks."""
    c = rollouts.completion_mask.shape[1]
    ids = rollouts.input_ids[:, -c:].cpu()  # [N, C]: completions are right-padded after the prompt block
    lengths = rollouts.completion_mask.sum(-1).cpu().tolist()  # [N]
    return [row[:n] for row, n in zip(ids.tolist(), lengths, strict=True)]


def decode_completion(tokenizer, token_ids: Sequence[int]) -> str:
    """Decode a completion without its trailing EOS/pad tokens.

    Other special tokens are kept: reasoning tags such as `<think>` are special tokens in some tokenizers, and the
    format reward must see them.
    """
    end = len(token_ids)
    stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    while end and token_ids[end - 1] in stop_ids:
        end -= 1
    return tokenizer.decode(list(token_ids[:end]), skip_special_tokens=False)
