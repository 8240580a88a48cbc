"""Copying pooled layers into private buffers ahead of their use (`memory.prefetch = "always"`).

On CPU a pooled weight can be read in place from the pool's shared mapping, which is the default;
"always" runs the copier instead, as a device that cannot read host memory at speed must: before
pooled layer i runs, layers i + 1 .. i + d (`memory.prefetch_distance`) are being copied by a
background thread into a fixed set of d + 1 reusable buffers, so a worker's private weight memory
stays within its budget plus those buffers. Layer i's parameters point at its buffer while it runs
and back at the pool after; a layer whose copy is not done when it is wanted waits (a stall,
counted). The copies go around: the last pooled layer's turn asks for the next forward's first.
Only layers are copied (every forward runs all of them, in order); the other pooled units (the
embeddings, the LM head) are read in place. A weight that oneDNN computes from its blocked
layout (workers/layers/linear.py `Packed`) is copied straight into that layout, as a private
weight is packed at load: its layer then runs at a private layer's speed, with bitwise its
results, where the plain layout costs a third of decode's matmul speed.
"""

from __future__ import annotations

import queue
import threading

import torch
from torch import nn

from workers.layers.linear import Packed, reorder
from workers.pool import Unit, round_up

WAIT_S = 60.0  # a copy of a layer from memory: far longer means the copier died
LINE = 64  # each parameter starts on a cache line of its buffer (so on its dtype's alignment)


class Prefetcher:
    def __init__(self, model: nn.Module, pooled: list[Unit], distance: int) -> None:
        self.layers = sorted((u for u in pooled if u.layer is not None), key=lambda u: u.layer)
        # each layer's linear modules whose weight is packed for oneDNN when private; the other
        # parameters (biases, norms) are copied as they are, into the layer's buffer
        self.packs = [_packs(model.get_submodule(u.name)) for u in self.layers]
        weights = [{id(m.weight) for m in packs} for packs in self.packs]
        self.params = [
            [p for _, p in u.params if id(p) not in w]
            for u, w in zip(self.layers, weights, strict=True)
        ]
        self.home = [[p.data for p in ps] for ps in self.params]
        self.distance = min(distance, max(1, len(self.layers) - 1))
        size = max((sum(round_up(p.nbytes, LINE) for p in ps) for ps in self.params), default=0)
        self.buffers = [torch.empty(size, dtype=torch.uint8) for _ in range(self.distance + 1)]
        # the packed copies of the layer in each buffer's turn: as large as the plain weights
        self.packed: list[list[torch.Tensor]] = [[] for _ in self.buffers]
        self.packed_bytes = max(
            (sum(m.weight.nbytes for m in packs) for packs in self.packs), default=0
        )
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
        return sum(b.numel() for b in self.buffers) + len(self.buffers) * self.packed_bytes

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
            self.packed[b] = [reorder(m.weight.detach()) for m in self.packs[i]]
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
        b = self.slot[i]
        for p, view in zip(self.params[i], self._views(i, b), strict=True):
            p.data = view
        for m, packed in zip(self.packs[i], self.packed[b], strict=True):
            m.packed, m.plain = packed, False
        self.expected = (i + 1) % len(self.layers)

    def release(self, i: int) -> None:
        """After pooled layer i ran: its parameters back on the pool, its buffer free."""
        for p, src in zip(self.params[i], self.home[i], strict=True):
            p.data = src
        for m in self.packs[i]:
            m.packed, m.plain = None, True
        self.asked.discard(i)
        b = self.slot.pop(i)
        self.packed[b] = []
        self.free.put(b)

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


def _packs(layer: nn.Module) -> list[Packed]:
    """The layer's linear modules computed from a pooled weight in its plain layout."""
    return [m for m in layer.modules() if isinstance(m, Packed) and m.plain]
