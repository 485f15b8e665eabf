"""Padding-free log-prob passes: sequences packed into one row per pass, passes filled up to a token budget.

Rollouts are padded to the step's longest prompt and completion, so with completions of uneven length a padded
pass spends much of its compute on padding (bench/README.md, section "Packing: micro-batches by a token
budget"). Here a pass instead concatenates the real tokens of whole sequences into a single row [1, T] without
padding:

- **Plan** (`plan_passes`): each sequence (or, with prompt sharing, each group of G completions of one prompt)
  costs the tokens it puts in the row; passes are filled first-fit-decreasing up to `token_budget` tokens, so the
  activations of a pass, and hence the training part's peak memory, are bounded by the budget instead of by
  `rows x the longest sequence`. Deterministic: ties are broken by row index.
- **Pack** (`pack_row`): position ids restart for every sequence (RoPE sees the positions of the padded pass), and
  each sequence's last token is left out (it predicts nothing). With prompt sharing a group is laid out as its
  prompt followed by its G completions, the completions' positions starting at the prompt length; each completion
  attends to the prompt and to itself, never to its siblings. That is the KV-cache path of `logprobs.py` (prompt
  computed once per group, gradients of all G completions reaching it) without a cache, so it also works under
  gradient checkpointing and mixes with other groups in one row.
- **Attention kept within a sequence** (`run_packed`): lightning_tina's CPU attention and the flash-attention
  kernels get the segment boundaries and compute each segment on its own keys (cost sum of l^2, not T^2);
  transformers' "sdpa" and "eager" get an explicit [1, 1, T, T] block mask (exact, but T^2 memory and work).
  Flash attention cannot express "prompt plus own completion", so there groups are packed without sharing.
- **Unpack** (`packed_logprobs`): the hidden states that predict completion tokens are gathered ([1, K, H]),
  go through the chunked log-softmax of `grpo.token_logprobs`, and are scattered back to the usual [n, C] layout
  (0 on padding), differentiably.

Exact: every real token sees the same keys, positions and weights as in the padded pass; only floating-point
summation order differs (`tests/test_packing.py`: log-probs and LoRA gradients in float32).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_tina import grpo
from lightning_tina.policy import backbone_and_head, causal_lm

Pass = list[list[int]]
"""One forward/backward pass: groups of row indices; the rows of a group share one prompt in the packed row."""


@dataclass(frozen=True)
class Segment:
    """Queries [start, end) of a packed row attend causally to themselves and fully to keys [prefix_start,
    prefix_end) (a shared prompt placed before them; empty when prefix_start == prefix_end)."""

    start: int
    end: int
    prefix_start: int = 0
    prefix_end: int = 0


@dataclass
class PackedRow:
    """One pass's sequences without padding, and where their completion log-probs go in the [n, C] layout."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    segments: tuple[Segment, ...]  # cover [0, T) in order
    predict_index: torch.Tensor  # [K] row positions whose hidden states predict a completion token
    targets: torch.Tensor  # [K] the completion tokens they predict
    out_rows: torch.Tensor  # [K] output row (position of the sequence in the pass's flattened order)
    out_cols: torch.Tensor  # [K] completion column


# ---- planning -------------------------------------------------------------------------------------------------------


def sequence_lengths(attention_mask: torch.Tensor, completion_len: int) -> tuple[list[int], list[int]]:
    """Real prompt and completion tokens of each row of a [N, P+C] mask: ([N] prompt lengths, [N] completion
    lengths) as Python ints (planning is done on the host, once per step)."""
    p = attention_mask.shape[1] - completion_len
    prompt = attention_mask[:, :p].sum(-1).tolist()  # [N]
    completion = attention_mask[:, p:].sum(-1).tolist()  # [N]
    return [int(x) for x in prompt], [int(x) for x in completion]


def shared_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int, g: int) -> bool:
    """Whether consecutive blocks of `g` rows really hold one prompt each (true for rollouts; cheap to check)."""
    n, total = input_ids.shape
    p = total - completion_len
    if g < 2 or n % g or p < 1:
        return False
    ids, mask = input_ids[:, :p].view(n // g, g, p), attention_mask[:, :p].view(n // g, g, p)  # [b, G, P]
    return bool((ids == ids[:, :1]).all()) and bool((mask == mask[:, :1]).all())


def plan_passes(
    prompt_lens: Sequence[int],
    completion_lens: Sequence[int],
    token_budget: int,
    group_size: int = 1,
    min_passes: int = 1,
) -> list[Pass]:
    """Passes of whole sequences whose packed rows hold at most `token_budget` tokens each (first-fit decreasing).

    With `group_size` > 1 the rows i*G .. i*G+G-1 are one item (their prompt packed once); a group larger than the
    budget is split into chunks of completions that each repeat the prompt. An item larger than the budget on its
    own gets a pass of its own. `min_passes` splits the largest passes until there are that many (FSDP2 ranks must
    run the same number of forwards). Rows without completion tokens cost nothing but are still planned, so every
    row of the step is in exactly one pass.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget={token_budget} must be >= 1")
    items = _items(prompt_lens, completion_lens, token_budget, max(group_size, 1))  # [(cost, rows)]
    order = sorted(range(len(items)), key=lambda i: (-items[i][0], items[i][1][0]))
    passes: list[Pass] = []
    loads: list[int] = []
    for i in order:
        cost, rows = items[i]
        for b, load in enumerate(loads):
            if load + cost <= token_budget:
                passes[b].append(rows)
                loads[b] += cost
                break
        else:
            passes.append([rows])
            loads.append(cost)
    passes = [sorted(p, key=lambda rows: rows[0]) for p in passes]
    return _split_to(passes, loads, min_passes, prompt_lens, completion_lens)


def _cost(prompt_len: int, completion_lens: Sequence[int]) -> int:
    """Tokens a prompt and its completions put in a packed row: the prompt once, each completion less its last
    token (which predicts nothing); 0 when no completion has a token."""
    body = sum(max(c - 1, 0) for c in completion_lens)
    return prompt_len + body if any(c > 0 for c in completion_lens) else 0


def _items(
    prompt_lens: Sequence[int], completion_lens: Sequence[int], budget: int, g: int
) -> list[tuple[int, list[int]]]:
    """Planning items: (cost, rows). A group over budget is split into chunks that each repeat the prompt."""
    items: list[tuple[int, list[int]]] = []
    for first in range(0, len(prompt_lens), g):
        rows = list(range(first, min(first + g, len(prompt_lens))))
        chunk: list[int] = []
        for r in rows:
            if chunk and _cost(prompt_lens[first], [completion_lens[i] for i in chunk + [r]]) > budget:
                items.append((_cost(prompt_lens[first], [completion_lens[i] for i in chunk]), chunk))
                chunk = []
            chunk.append(r)
        items.append((_cost(prompt_lens[first], [completion_lens[i] for i in chunk]), chunk))
    return items


def _split_to(
    passes: list[Pass], loads: list[int], k: int, prompt_lens: Sequence[int], completion_lens: Sequence[int]
) -> list[Pass]:
    """Split the most loaded pass with several groups (else several rows) in two until there are `k` passes."""
    passes = [list(p) for p in passes]
    while len(passes) < k:
        splittable = [i for i, p in enumerate(passes) if len(p) > 1 or len(p[0]) > 1]
        if not splittable:
            break
        i = max(splittable, key=lambda j: (loads[j], -j))
        p = passes.pop(i)
        loads.pop(i)
        halves = (
            [p[: len(p) // 2], p[len(p) // 2 :]]
            if len(p) > 1
            else [[p[0][: len(p[0]) // 2]], [p[0][len(p[0]) // 2 :]]]
        )
        for h in halves:
            passes.append(h)
            loads.append(sum(_cost(prompt_lens[rows[0]], [completion_lens[r] for r in rows]) for rows in h))
    return passes


def flat_rows(p: Pass) -> list[int]:
    """The rows of a pass in the order its log-probs come back from `packed_logprobs`."""
    return [r for rows in p for r in rows]


# ---- packing --------------------------------------------------------------------------------------------------------


def pack_row(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int, p: Pass, share_prompt: bool
) -> PackedRow:
    """The real tokens of the rows of pass `p` (from a left-padded prompt / right-padded completion batch
    [N, P+C]) as one row, with per-sequence positions and segments; groups of several rows share their prompt
    when `share_prompt` is set (the caller has checked that they hold one prompt)."""
    width = input_ids.shape[1] - completion_len
    ids, pos, segs, pred, tgt, out_r, out_c = [], [], [], [], [], [], []
    offset, out = 0, 0
    for rows in p:
        shared = share_prompt and len(rows) > 1
        prompt_at = -1
        for j, r in enumerate(rows):
            real = attention_mask[r].bool()  # [P+C]
            prompt = input_ids[r, :width][real[:width]]  # [p_r]
            cols = real[width:].nonzero().squeeze(1)  # [L]: completion columns with a token
            n_prompt, n_comp = prompt.numel(), cols.numel()
            if n_comp == 0:
                continue
            if n_prompt == 0:
                raise ValueError(f"row {r} has no prompt token: nothing predicts its first completion token")
            comp = input_ids[r, width + cols]  # [L]
            if shared and prompt_at < 0:  # the group's prompt, once, before its first non-empty completion
                prompt_at = offset
                ids.append(prompt)
                pos.append(torch.arange(n_prompt))
                segs.append(Segment(offset, offset + n_prompt))
                offset += n_prompt
            body = comp[:-1] if shared else torch.cat([prompt, comp[:-1]])  # [L-1] or [p_r+L-1]
            start = n_prompt if shared else 0
            ids.append(body)
            pos.append(torch.arange(start, start + body.numel()))
            if body.numel():
                prefix = (prompt_at, prompt_at + n_prompt) if shared else (0, 0)
                segs.append(Segment(offset, offset + body.numel(), *prefix))
            if shared:
                pred.append(torch.tensor([prompt_at + n_prompt - 1]))
                pred.append(torch.arange(offset, offset + n_comp - 1))
            else:
                pred.append(torch.arange(offset + n_prompt - 1, offset + n_prompt + n_comp - 1))
            offset += body.numel()
            tgt.append(comp)
            out_r.append(torch.full((n_comp,), out + j))
            out_c.append(cols)
        out += len(rows)
    return _assemble(ids, pos, segs, pred, tgt, out_r, out_c, input_ids.device)


def _assemble(
    ids: list[torch.Tensor],
    pos: list[torch.Tensor],
    segs: list[Segment],
    pred: list[torch.Tensor],
    tgt: list[torch.Tensor],
    out_r: list[torch.Tensor],
    out_c: list[torch.Tensor],
    device: torch.device,
) -> PackedRow:
    """Concatenate the pieces of `pack_row` (an empty pass gives an empty row)."""

    def cat(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts).to(device) if parts else torch.zeros(0, dtype=torch.long, device=device)

    return PackedRow(
        input_ids=cat(ids).unsqueeze(0),  # [1, T]
        position_ids=cat(pos).unsqueeze(0),  # [1, T]
        segments=tuple(segs),
        predict_index=cat(pred),  # [K]
        targets=cat(tgt),  # [K]
        out_rows=cat(out_r),  # [K]
        out_cols=cat(out_c),  # [K]
    )


# ---- running the model on a packed row ------------------------------------------------------------------------------


def can_share_prompt(attn_implementation: str | None) -> bool:
    """Whether the attention can let a completion see a prompt placed elsewhere in the row (not flash attention:
    its variable-length kernels take disjoint segments only)."""
    return not (attn_implementation or "").startswith(("flash", "kernels-community"))


def run_packed(model: nn.Module, row: PackedRow) -> torch.Tensor:
    """The final-norm hidden states [1, T, H] of a packed row, attention kept within each segment."""
    from lightning_tina import logprobs
    from lightning_tina.attention import CPU_ATTENTION, PACKED_SEGMENTS_KWARG

    config = causal_lm(model).config
    attn = config._attn_implementation
    if "sliding_attention" in set(getattr(config, "layer_types", None) or []):
        raise NotImplementedError(
            "packing does not support sliding-window layers; set micro_batch_tokens null"
        )
    kwargs: dict[str, Any] = {
        "input_ids": row.input_ids,
        "position_ids": row.position_ids,
        "use_cache": False,
    }
    if attn == CPU_ATTENTION:
        kwargs.update(attention_mask={"full_attention": None}, **{PACKED_SEGMENTS_KWARG: row.segments})
    elif not can_share_prompt(attn):
        if any(s.prefix_end > s.prefix_start for s in row.segments):
            raise ValueError(f"{attn} cannot pack shared prompts: pack without share_prompt")
        cu = torch.tensor([0] + [s.end for s in row.segments], dtype=torch.int32, device=row.input_ids.device)
        longest = max((s.end - s.start for s in row.segments), default=1)
        kwargs.update(
            attention_mask={"full_attention": None},
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=longest,
            max_length_k=longest,
        )
    else:  # sdpa, eager and others: an explicit block mask
        mask = block_mask(row.segments, row.input_ids.shape[1], row.input_ids.device)  # [1, 1, T, T] bool
        if attn != "sdpa":
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill_(
                ~mask, torch.finfo(torch.float32).min
            )
        kwargs["attention_mask"] = {"full_attention": mask}
    backbone, _ = backbone_and_head(model)
    hidden, _ = logprobs._run(model, backbone, **kwargs)  # [1, T, H]
    return hidden


def block_mask(segments: Sequence[Segment], t: int, device: torch.device) -> torch.Tensor:
    """[1, 1, T, T] bool: True where a query may attend to a key (its segment causally, its prefix fully)."""
    mask = torch.zeros(t, t, dtype=torch.bool, device=device)  # [T, T]
    for s in segments:
        n = s.end - s.start
        mask[s.start : s.end, s.start : s.end] = torch.ones(n, n, dtype=torch.bool, device=device).tril_()
        mask[s.start : s.end, s.prefix_start : s.prefix_end] = True
    return mask[None, None]


@functools.lru_cache(maxsize=32)
def _segment_mask(q: int, prefix: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive [1, 1, q, prefix + q] mask: the prefix fully visible, the segment causal."""
    allowed = torch.ones(q, q, dtype=torch.bool, device=device).tril_()  # [q, q]
    allowed = torch.cat([torch.ones(q, prefix, dtype=torch.bool, device=device), allowed], 1)  # [q, prefix+q]
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )[None, None]


def segment_attention(
    module: nn.Module,
    query: torch.Tensor,  # [1, heads, T, d]
    key: torch.Tensor,  # [1, kv_heads, T, d]
    value: torch.Tensor,  # [1, kv_heads, T, d]
    segments: Sequence[Segment],
    kernel: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of a packed row computed segment by segment with `kernel` (a transformers attention function
    taking an additive mask), so the work is that of the sequences, not of the [T, T] row. Returns [1, T, heads, d].

    The row is cut with one `split` per tensor (its backward is one concatenation; slicing each segment out
    would make a zero-filled [T] gradient per segment); a prefix (a shared prompt) is the piece of its own
    segment, so its gradient from every completion accumulates there.
    """
    widths = [s.end - s.start for s in segments]
    qs, ks, vs = query.split(widths, 2), key.split(widths, 2), value.split(widths, 2)  # [1, *, l, d] pieces
    piece = {(s.start, s.end): i for i, s in enumerate(segments)}
    outs = []
    for i, s in enumerate(segments):
        k, v = ks[i], vs[i]  # [1, kv_heads, l, d]
        prefix = s.prefix_end - s.prefix_start
        if prefix:
            j = piece.get((s.prefix_start, s.prefix_end))
            pk = (
                ks[j] if j is not None else key[:, :, s.prefix_start : s.prefix_end]
            )  # [1, kv_heads, prefix, d]
            pv = vs[j] if j is not None else value[:, :, s.prefix_start : s.prefix_end]
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)  # [1, kv_heads, prefix+l, d]
        mask = _segment_mask(widths[i], prefix, query.dtype, query.device)  # [1, 1, l, prefix+l]
        out, _ = kernel(module, qs[i], k, v, mask, **kwargs)  # [1, l, heads, d]
        outs.append(out)
    return torch.cat(outs, 1), None  # [1, T, heads, d]


# ---- log-probs ------------------------------------------------------------------------------------------------------


def packed_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_len: int,
    p: Pass,
    share_prompt: bool = True,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs and entropies of the completions of the rows of pass `p`, computed on one packed row:
    ([n', C], [n', C] or None), rows in `flat_rows(p)` order, 0 on padding. The same values as
    `logprobs.completion_logprobs` on those rows (up to summation order); `share_prompt` needs the rows of each
    group of `p` to hold one prompt (see `shared_groups`) and is ignored under flash attention."""
    attn = causal_lm(model).config._attn_implementation
    row = pack_row(input_ids, attention_mask, completion_len, p, share_prompt and can_share_prompt(attn))
    n = len(flat_rows(p))
    _, head = backbone_and_head(model)
    if row.targets.numel() == 0:
        zeros = torch.zeros(n, completion_len, device=input_ids.device)  # [n', C]
        return zeros, zeros.clone() if with_entropy else None
    hidden = run_packed(model, row)[:, row.predict_index]  # [1, K, H]
    logps, entropy = grpo.token_logprobs(
        hidden, row.targets[None], head.weight, head.bias, temperature, chunk_tokens, with_entropy
    )  # [1, K] each
    return _unpack(logps[0], row, n, completion_len), (
        _unpack(entropy[0], row, n, completion_len) if entropy is not None else None
    )


def _unpack(values: torch.Tensor, row: PackedRow, n: int, c: int) -> torch.Tensor:
    """Per-token values [K] back to the [n, C] layout (0 where a row has no token), keeping gradients."""
    return values.new_zeros(n, c).index_put((row.out_rows, row.out_cols), values)  # [n, C]


def prompt_runs(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int) -> Pass:
    """The rows of a batch [n, P+C] as one pass whose groups are runs of consecutive rows with the same prompt
    (a pass planned by `plan_passes` keeps a group's rows together, so this recovers its groups; two groups that
    happen to hold the same prompt merge, which is just as exact)."""
    p = input_ids.shape[1] - completion_len
    ids, mask = input_ids[:, :p], attention_mask[:, :p]  # [n, P]
    same = (
        ((ids[1:] == ids[:-1]) & (mask[1:] == mask[:-1])).all(-1).tolist()
    )  # [n-1]: row i+1 continues row i
    groups: Pass = [[0]] if input_ids.shape[0] else []
    for i, cont in enumerate(same, start=1):
        if cont:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


AUTO_MAX_TOKENS = 4096
"""The largest pass micro_batch_tokens "auto" packs: on the 18M bench model in bf16 on this CPU, passes of 2,048
and 4,096 tokens trained faster than one pass of the whole 15,360-token step (and need less memory)."""

AUTO_MIN_PADDING = 0.1
"""micro_batch_tokens "auto" packs a step when at least this share of the tokens that count-based micro-batches
would compute is padding: at fixed lengths (no padding) the batched count-based pass was as fast or faster on
this CPU, with uneven lengths packing won (bench/README.md, section "Packing: micro-batches by a token budget")."""


def worth_packing(
    attention_mask: torch.Tensor, completion_len: int, micro_batch_size: int, trim: bool
) -> bool:
    """Whether count-based micro-batches of these rows [N, P+C] would spend at least AUTO_MIN_PADDING of their
    tokens on padding (with `trim`, each micro-batch at its own trimmed width, as `logprobs` runs it)."""
    from lightning_tina.logprobs import trim_unused_columns

    n = attention_mask.shape[0]
    padded = 0
    for i in range(0, n, micro_batch_size):
        m = attention_mask[i : i + micro_batch_size]  # [mb, P+C]
        width = trim_unused_columns(m, m, completion_len)[0].shape[1] if trim else m.shape[1]
        padded += m.shape[0] * width
    return int(attention_mask.sum()) <= (1 - AUTO_MIN_PADDING) * padded
