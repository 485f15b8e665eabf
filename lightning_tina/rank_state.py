"""Resume state that differs between ranks (data stream position, sampling RNG), saved for every rank.

Lightning writes checkpoints from rank 0, so a callback's or DataModule's `state_dict` would hold rank 0's state
only, and on resume every rank would restart from rank 0's stream position and RNG. `gather_ranks` (called on every
rank, in the same order, as Lightning's checkpointing does) stores each rank's state under "per_rank" next to rank
0's (the top-level keys, which a run with another world size falls back to); `own_rank` picks this rank's entry.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

PER_RANK = "per_rank"


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_ranks(local: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's state with every rank's state under "per_rank" (a collective when world size > 1)."""
    _, world = _world()
    if world == 1:
        return local
    states: list[Any] = [None] * world
    dist.all_gather_object(states, local)
    return {**states[0], PER_RANK: states}


def own_rank(saved: dict[str, Any]) -> dict[str, Any]:
    """This rank's saved state; rank 0's when the checkpoint has none for it (e.g. another world size)."""
    rank, world = _world()
    states = saved.get(PER_RANK)
    if isinstance(states, list) and len(states) == world:
        return states[rank]
    return {k: v for k, v in saved.items() if k != PER_RANK}
