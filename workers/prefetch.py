"""Copying pooled layers into private buffers ahead of their use (`memory.prefetch = "always"`).

On CPU a pooled weight can be read in place from the pool's shared mapping, which is the default;
"always" runs the copier instead, as a device that cannot read host memory at speed must: before
pooled layer i runs, layers i + 1 .. i + d (`memory.prefetch_distance`) are being copied by a
background thread into a fixed set of d + 1 reusable buffers, so a worker's private weight memory
stays within its budget plus those buffers. Layer i's parameters point at its buffer while it runs
and back at the pool after; a layer whose copy is not done when it is wanted waits (a stall,
counted). The copies go around: the last pooled layer's turn asks for the next forward's first.
Only layers are copied (every forward runs all of them, in order); the other pooled units (the
embeddings, the LM head) are read in place.
"""

from __future__ import annotations

import queue
import threading

import torch
from torch import nn

from workers.pool import Unit, round_up

WAIT_S = 60.0  # a copy of a layer from memory: far longer means the copier died
LINE = 64  # each parameter starts on a cache line of its buffer (so on its dtype's alignment)


class Prefetcher:
    def __init__(self, model: nn.Module, pooled: list[Unit], distance: int) -> None:
        self.layers = sorted((u for u in pooled if u.layer is not None), key=lambda u: u.layer)
        self.home = [[p.data for _, p in u.params] for u in self.layers]
        self.params = [[p for _, p in u.params] for u in self.layers]
        self.distance = min(distance, max(1, len(self.layers) - 1))
        size = max(
            (sum(round_up(p.nbytes, LINE) for _, p in u.params) for u in self.layers), default=0
        )
        self.buffers = [torch.empty(size, dtype=torch.uint8) for _ in range(self.distance + 1)]
        self.free: queue.Queue[int] = queue.Queue()
        for b in range(len(self.buffers)):
            self.free.put(b)
        self.todo: queue.Queue[int | None] = queue.Queue()
        self.ready = [threading.Event() for _ in self.layers]
        self.slot: dict[int, int] = {}  # pooled layer -> the buffer it was copied into
        self.asked: set[int] = set()
        self.expected = 0
        self.prefetches = self.stalls = 0
        # lives as long as the worker: a daemon, idle on its queue between copies
        self.copier = threading.Thread(target=self._copy, name="prefetch", daemon=True)
        self.copier.start()
        for i, u in enumerate(self.layers):
            module = model.get_submodule(u.name)
            module.register_forward_pre_hook(lambda m, args, i=i: self.acquire(i))
            module.register_forward_hook(lambda m, args, out, i=i: self.release(i))

    @property
    def buffer_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers)

    def _views(self, i: int, b: int) -> list[torch.Tensor]:
        """Pooled layer i's parameters as they lie in buffer b, one after another."""
        out, offset = [], 0
        for src in self.home[i]:
            out.append(
                self.buffers[b][offset : offset + src.nbytes].view(src.dtype).view(src.shape)
            )
            offset += round_up(src.nbytes, LINE)
        return out

    def _copy(self) -> None:
        while (i := self.todo.get()) is not None:
            b = self.free.get()
            for dst, src in zip(self._views(i, b), self.home[i], strict=True):
                dst.copy_(src)
            self.slot[i] = b
            self.prefetches += 1
            self.ready[i].set()

    def _ask(self, i: int) -> None:
        if i not in self.asked:
            self.asked.add(i)
            self.ready[i].clear()
            self.todo.put(i)

    def acquire(self, i: int) -> None:
        """Before pooled layer i runs: its copy (waited for), and the next ones asked for."""
        if i != self.expected:
            self._reset()  # a forward broke off (an error) and this one starts elsewhere
        for k in range(i, i + self.distance + 1):
            self._ask(k % len(self.layers))
        if not self.ready[i].is_set():
            self.stalls += 1
            if not self.ready[i].wait(WAIT_S):
                raise RuntimeError(f"the prefetch of pooled layer {i} did not finish")
        for p, view in zip(self.params[i], self._views(i, self.slot[i]), strict=True):
            p.data = view
        self.expected = (i + 1) % len(self.layers)

    def release(self, i: int) -> None:
        """After pooled layer i ran: its parameters back on the pool, its buffer free."""
        for p, src in zip(self.params[i], self.home[i], strict=True):
            p.data = src
        self.asked.discard(i)
        self.free.put(self.slot.pop(i))

    def _reset(self) -> None:
        """Forget every copy asked for: the buffers of those done first (a copy still queued may
        be waiting for one), then each of the others as it finishes."""
        pending = sorted(self.asked)
        for i in pending:
            if self.ready[i].is_set():
                self.release(i)
        for i in pending:
            if i in self.asked:
                if not self.ready[i].wait(WAIT_S):
                    raise RuntimeError(f"the prefetch of pooled layer {i} did not finish")
                self.release(i)
