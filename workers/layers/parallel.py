"""Tensor-parallel process group: one per pipeline stage, its world is that stage's TP ranks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from workers.layers.shared_reduce import SharedReduce

LOOPBACK = "lo"


@dataclass(slots=True)
class TPGroup:
    rank: int
    size: int
    group: object | None
    shared: SharedReduce | None = None  # CPU ranks: all-reduce through shared memory

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` across the group in place."""
        if self.size > 1 and not (self.shared is not None and self.shared.reduce(t)):
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `t` along `dim`, in rank order."""
        if self.size == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


def init_tp_group(
    tp_rank: int,
    tensor: int,
    init_method: str,
    device: str,
    timeout_s: float = 60,
    shared: tuple[Path, Path] | None = None,
) -> TPGroup:
    """Join the stage's TP group; blocks until all `tensor` ranks arrive or `timeout_s` passes.
    On CPU, `shared` (a region's path in shared memory, a private FIFO path prefix) makes its
    all-reduces go through shared memory (workers/layers/shared_reduce.py)."""
    if tensor == 1:
        return TPGroup(0, 1, None)
    if not 0 <= tp_rank < tensor:
        raise ValueError(f"tp_rank {tp_rank} outside 0..{tensor - 1}")
    cuda = device.startswith("cuda")
    # Every rank is on this host: gloo's pairs and NCCL's bootstrap listen on loopback only, not
    # on whatever address the hostname resolves to. Neither authenticates its peers; see
    # docs/security.md. The rendezvous is a file store in the private run directory.
    os.environ["GLOO_SOCKET_IFNAME"] = LOOPBACK
    os.environ["NCCL_SOCKET_IFNAME"] = LOOPBACK
    if cuda:
        # NCCL binds communicators to the current device, so pick ours before joining.
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(
        backend="nccl" if cuda else "gloo",
        init_method=init_method,
        rank=tp_rank,
        world_size=tensor,
        timeout=timedelta(seconds=timeout_s),
    )
    group = TPGroup(tp_rank, tensor, dist.group.WORLD)
    if shared is not None and not cuda:
        group.shared = SharedReduce(*shared, tp_rank, tensor, timeout_s)
    return group


def close(group: TPGroup) -> None:
    if group.shared is not None:
        group.shared.close()
        group.shared = None
    if group.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    group.group = None
