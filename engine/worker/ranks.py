"""Rank 0 decides, every rank acts: the worker's only collectives outside the Trainer's own.

Under torchrun every control decision (stop, save, pause, a disk hold, an
anomaly) must be taken on the same step by every rank, or a collective of the
next step waits forever. Rank 0 alone reads control requests and the disk, so
its values are broadcast; a local fact that any rank may see first (a
non-finite loss) is combined with a max. Outside torchrun both are no-ops.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree(device, *values: int) -> tuple[int, ...]:
    """Rank 0's values, on every rank."""
    if not distributed():
        return tuple(int(v) for v in values)
    flags = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    dist.broadcast(flags, src=0)
    return tuple(int(v) for v in flags.tolist())


def any_rank(flag: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor, true on every rank where it is true on any (no host sync outside torchrun)."""
    if not distributed():
        return flag
    as_int = flag.to(torch.int64)
    dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
    return as_int.bool()
