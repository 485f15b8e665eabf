"""DAPO's dynamic sampling (model.grpo.dynamic_sampling): train only on groups whose rewards differ.

A group whose G rewards are all equal has advantage 0 for every completion: its rollouts cost generation and a
backward pass and buy no policy gradient (only the KL term). `fill_informative` drops such groups and draws fresh
prompts from the stream (`draw`), round after round, until the step has `target` informative groups or
`max_rounds` extra rounds were generated; then it trains on what it has, topped up with dropped groups (zero
advantage) so that every step, on every rank, has the same B x G shape.

DDP: before each round the ranks agree (`sync_max`, an all-reduce max) on the number of prompts still missing on
the neediest rank, and every rank draws that many: all ranks generate the same number of rounds (an FSDP-sharded
policy needs every rank in every generate call), and each keeps exactly `target` groups (surplus informative groups
are discarded and counted), so every rank runs the same micro-batches and backward passes.
Resume: the extra prompts come from the DataModule's stream (`ReasoningDataModule.refill`), whose checkpoint
records the ranges they read, and the sampling RNG is checkpointed after the step, extra rounds included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from lightning_tina.rewards import RewardOutput
from lightning_tina.rollout.batch import take_rows
from lightning_tina.types import Rollouts


class Scored(NamedTuple):
    """Rollouts and their rewards, row-aligned (group-major, G rows per prompt)."""

    rollouts: Rollouts
    scores: RewardOutput


class DynamicStats(NamedTuple):
    """What one step of dynamic sampling did (logged under dynamic/)."""

    groups_kept: int  # informative groups in the step's batch
    groups_dropped: int  # all-equal groups seen this step (first round and refills)
    groups_padded: int  # dropped groups put back to fill the batch when max_rounds ran out
    groups_surplus: int  # informative groups beyond the target (DDP: the ranks draw alike), discarded
    refill_rounds: int  # extra generation rounds
    rollout_tokens: int  # completion tokens generated this step, all rounds


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Groups whose rewards are not all equal: keep_b = max_g r_bg > min_g r_bg. `rewards` [N] -> [B] bool."""
    grouped = rewards.view(-1, group_size)  # [B, G]
    return grouped.amax(dim=1) > grouped.amin(dim=1)  # [B]


def group_rows(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """The row indices [len(groups) * G] of whole groups `groups` [k] (long)."""
    return (groups[:, None] * group_size + torch.arange(group_size)).reshape(-1)


def take(scored: Scored, groups: torch.Tensor, group_size: int) -> Scored:
    """The groups `groups` [k] of `scored`, in that order."""
    rows = group_rows(groups.cpu(), group_size)  # [k * G]
    s = scored.scores
    per_function = s.per_function[rows]  # [k * G, F]
    scores = RewardOutput(per_function, s.total[rows], s.timeouts, _none_fraction(per_function))
    return Scored(take_rows(scored.rollouts, rows), scores)


def _none_fraction(per_function: torch.Tensor) -> torch.Tensor:
    return per_function.isnan().float().mean(0) if per_function.shape[0] else per_function.new_zeros(0)  # [F]


def concat(parts: Sequence[Scored], pad_id: int) -> Scored:
    """Rows of all parts, in order, re-padded to the widest prompt (left) and completion (right)."""
    p = max(part.rollouts.input_ids.shape[1] - part.rollouts.completion_mask.shape[1] for part in parts)
    c = max(part.rollouts.completion_mask.shape[1] for part in parts)
    ids, attn, cmask, elp = [], [], [], []
    for part in parts:
        r = part.rollouts
        pk = r.input_ids.shape[1] - r.completion_mask.shape[1]  # this part's prompt width
        left, right = p - pk, c - r.completion_mask.shape[1]
        ids.append(torch.nn.functional.pad(r.input_ids, (left, right), value=pad_id))  # [n, P + C]
        attn.append(torch.nn.functional.pad(r.attention_mask, (left, right)))  # [n, P + C]
        cmask.append(torch.nn.functional.pad(r.completion_mask, (0, right)))  # [n, C]
        elp.append(
            None if r.engine_logprobs is None else torch.nn.functional.pad(r.engine_logprobs, (0, right))
        )
    rollouts = Rollouts(
        input_ids=torch.cat(ids),
        attention_mask=torch.cat(attn),
        completion_mask=torch.cat(cmask),
        completions=[x for part in parts for x in part.rollouts.completions],
        rows=[x for part in parts for x in part.rollouts.rows],
        truncated=torch.cat([part.rollouts.truncated for part in parts]),
        engine_logprobs=None if any(e is None for e in elp) else torch.cat(elp),  # type: ignore[arg-type]
    )
    per_function = torch.cat([part.scores.per_function for part in parts])  # [N, F]
    total = torch.cat([part.scores.total for part in parts])  # [N]
    timeouts = sum(part.scores.timeouts for part in parts)
    return Scored(rollouts, RewardOutput(per_function, total, timeouts, _none_fraction(per_function)))


def fill_informative(
    first: Scored,
    draw: Callable[[int], Scored],
    target: int,
    group_size: int,
    max_rounds: int,
    pad_id: int,
    sync_max: Callable[[int], int] = lambda x: x,
) -> tuple[Scored, DynamicStats]:
    """The step's batch of `target` groups: informative ones from `first` and from up to `max_rounds` refills.

    `draw(k)` generates and scores G completions for k fresh prompts. `sync_max(x)` is the maximum of x over the
    ranks (identity on one process). Returns the batch (kept groups first, then any padding groups) and its stats.
    """
    kept: list[Scored] = []
    dropped: list[Scored] = []
    n_kept = rounds = tokens = 0
    current = first
    while True:
        tokens += int(current.rollouts.completion_mask.sum())
        keep = informative_groups(current.scores.total, group_size)  # [b]
        kept.append(take(current, keep.nonzero().flatten(), group_size))
        dropped.append(take(current, (~keep).nonzero().flatten(), group_size))
        n_kept += int(keep.sum())
        need = sync_max(max(target - n_kept, 0))
        if need == 0 or rounds >= max_rounds:
            break
        current = draw(need)
        rounds += 1
    n_dropped = sum(d.rollouts.input_ids.shape[0] for d in dropped) // group_size
    padded = max(target - n_kept, 0)
    batch = concat([*kept, *dropped], pad_id)
    batch = take(
        batch, torch.arange(target), group_size
    )  # kept first: surplus or missing groups cut/filled here
    stats = DynamicStats(min(n_kept, target), n_dropped, padded, max(n_kept - target, 0), rounds, tokens)
    return batch, stats
