"""One run on several processes: a random stream per rank, gathering small state to rank 0, and
other ranks waiting while rank 0 works alone.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import torch.distributed as dist

#: How long the other ranks wait for rank 0 (evaluation, export) before giving up.
RANK_ZERO_WAIT = timedelta(days=7)


def rank_seed(seed: int, rank: int, *more: int) -> int:
    """The seed of rank ``rank``'s generator: ``seed`` itself on rank 0 (a single-process run
    keeps its stream), a 63-bit mix of (seed, rank, *more) otherwise (independent streams)."""
    if rank == 0 and not any(more):
        return seed
    state = np.random.SeedSequence([seed % 2**63, rank, *more]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order, on every rank (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class RankZeroSection:
    """``with RankZeroSection():`` around work that only rank 0 does (evaluation every N steps).

    Every rank enters; on leaving, all ranks meet at a barrier of their own CPU (gloo) process
    group whose timeout is :data:`RANK_ZERO_WAIT`, instead of the first collective of the next
    training step, whose timeout (NCCL's, 10 to 30 minutes) a long evaluation would exceed. The
    waiting ranks hold no GPU collective open, so nothing else can time out meanwhile.
    Single-process runs skip the barrier. A rank that fails inside the section still meets the
    others, which then fail at their next collective instead of waiting out the timeout.
    """

    def __init__(self):
        self._group = None

    def __enter__(self):
        if is_distributed() and self._group is None:
            # every rank creates the group at the same point: the first section of the run
            self._group = dist.new_group(backend="gloo", timeout=RANK_ZERO_WAIT)
        return self

    def __exit__(self, *exc) -> None:
        if is_distributed():  # also when rank 0 failed: the others then fail at the next step
            dist.barrier(group=self._group)
