"""All-reduce through shared memory, for the CPU ranks of one tensor-parallel group (all on one
host): each rank copies its tensor into its slot of a shared region, tells its peers through
their FIFOs, waits for theirs, then sums every slot in rank order, so all ranks hold the same
bits. One copy and one summing pass, against gloo's loopback TCP transfers and reductions in
steps: the group's fixed cost per layer, which does not shrink as the matmuls split.

Two sets of slots are used in turn. A rank can only be one all-reduce ahead of a peer (it needs
the peer's signal for each), so the set it writes next is never one a peer is still reading.
Tensors larger than a slot, or not contiguous, go through gloo instead (`reduce` says which).
"""

from __future__ import annotations

import mmap
import os
import select
from pathlib import Path

import torch
import torch.distributed as dist

SLOT = 16 << 20  # bytes a rank's tensor may have (4,096 tokens x 1,024 float32 features)


def paths(store: Path) -> tuple[Path, Path]:
    """The region and the FIFOs' prefix of the group whose rendezvous file is `store`, in its
    controller's private run directory: the FIFOs beside it, the region in the host's shared
    memory named after both directories (`baton up` removes what a crash leaves there)."""
    run = store.parent
    return Path(
        "/dev/shm"
    ) / f"{run.parent.name}-{run.name}-{store.stem}.reduce", store.with_suffix(".fifo")


class SharedReduce:
    def __init__(self, data: Path, fifos: Path, rank: int, size: int, timeout_s: float) -> None:
        """Join the group's region `data` (in shared memory) and FIFOs `fifos`.N (a private
        directory); collective: every rank of the group calls it, with the process group up."""
        self.rank, self.size, self.timeout_s = rank, size, timeout_s
        self.turn = 0
        mine = Path(f"{fifos}.{rank}")
        mine.unlink(missing_ok=True)  # a killed predecessor's FIFO may hold its bytes
        os.mkfifo(mine, 0o600)
        self.inbox = os.open(mine, os.O_RDONLY | os.O_NONBLOCK)
        nbytes = 2 * size * SLOT
        if rank == 0:
            data.unlink(missing_ok=True)
            fd = os.open(data, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, nbytes)  # sparse: only what is written takes memory
            os.close(fd)
        dist.barrier()
        fd = os.open(data, os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self.raw = torch.frombuffer(self.map, dtype=torch.uint8)
        self.peers = [
            os.open(f"{fifos}.{r}", os.O_WRONLY | os.O_NONBLOCK) for r in range(size) if r != rank
        ]
        dist.barrier()  # all mapped and connected: nothing needs the names any more
        mine.unlink()
        if rank == 0:
            data.unlink()

    def reduce(self, t: torch.Tensor) -> bool:
        """Sum `t` across the group in place; False (untouched) where it does not fit here."""
        n = t.numel() * t.element_size()
        if n > SLOT or not t.is_contiguous() or t.device.type != "cpu":
            return False
        half = self.turn % 2
        self.turn += 1
        self._slot(half, self.rank, t).copy_(t)
        for fd in self.peers:
            os.write(fd, b"\0")
        self._wait(self.size - 1)
        torch.add(self._slot(half, 0, t), self._slot(half, 1, t), out=t)
        for r in range(2, self.size):
            t.add_(self._slot(half, r, t))
        return True

    def _slot(self, half: int, rank: int, like: torch.Tensor) -> torch.Tensor:
        start = (half * self.size + rank) * SLOT
        n = like.numel() * like.element_size()
        return self.raw[start : start + n].view(like.dtype).view(like.shape)

    def _wait(self, signals: int) -> None:
        """The peers' signals for this turn, each within the group's timeout."""
        while signals:
            ready, _, _ = select.select([self.inbox], [], [], self.timeout_s)
            if not ready:
                raise TimeoutError(f"no tensor-parallel peer signal in {self.timeout_s} s")
            got = os.read(self.inbox, signals)
            if not got:
                raise ConnectionError("a tensor-parallel peer is gone")
            signals -= len(got)

    def close(self) -> None:
        for fd in (self.inbox, *self.peers):
            os.close(fd)
        self.peers = []
        del self.raw
        self.map.close()
