"""Copying pooled layers into private buffers ahead of their use (`memory.prefetch = "always"`).

On CPU a pooled weight can be read in place from the pool's shared mapping, which is the default;
"always" runs the copier instead, as a device that cannot read host memory at speed must: before
pooled layer i runs, layers i + 1 .. i + d (`memory.prefetch_distance`) are being copied by a
background thread into a fixed set of d + 1 reusable buffers, so a worker's private weight memory
stays within its budget plus those buffers. Layer i's parameters point at its buffer while it runs
and back at the pool after; a layer whose copy is not done when it is wanted waits (a stall,
counted). The copies go around: the last pooled layer's turn asks for the next forward's first.
There the copier runs at the lowest CPU priority: on a host whose cores the matmuls already fill,
a copier of equal rank would take cores from under their threads, and every thread of a matmul
waits for the slowest at its end; at the lowest, it copies in the time the cores are free
(between steps, a stall), which took the copied-ahead fleet from 0.79 to 0.83 of all-private on
2 cores (docs/performance.md).
Only layers are copied (every forward runs all of them, in order); the other pooled units (the
embeddings, the LM head) are read in place.

On a GPU the copier always runs (only layers are pooled there: workers/pool.py `choose`): the
buffers are device memory, the pool's mapping is pinned, and the copies go on a stream of their
own, ordered by events rather than by waiting: a layer's kernels wait (on the GPU) for its copy's
event, and a copy into a buffer waits for the event recorded after the buffer's last layer ran.
A stall there is a copy that ended after the compute stream reached the layer (the two events'
times, read once both are done).
"""

from __future__ import annotations

import os
import queue
import threading

import torch
from torch import nn

from workers.pool import Unit, round_up

WAIT_S = 60.0  # a copy of a layer from memory: far longer means the copier died
LOWEST = 19  # the copier's niceness on CPU
LINE = 64  # each parameter starts on a cache line of its buffer (so on its dtype's alignment)


class Prefetcher:
    def __init__(
        self,
        model: nn.Module,
        pooled: list[Unit],
        distance: int,
        device: torch.device | None = None,
    ) -> None:
        self.device = device = device or torch.device("cpu")
        self.cuda = device.type == "cuda"
        self.layers = sorted((u for u in pooled if u.layer is not None), key=lambda u: u.layer)
        self.home = [[p.data for _, p in u.params] for u in self.layers]
        self.params = [[p for _, p in u.params] for u in self.layers]
        self.distance = min(distance, max(1, len(self.layers) - 1))
        size = max(
            (sum(round_up(p.nbytes, LINE) for _, p in u.params) for u in self.layers), default=0
        )
        self.buffers = [
            torch.empty(size, dtype=torch.uint8, device=device) for _ in range(self.distance + 1)
        ]
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
            self.copied: list[torch.cuda.Event | None] = [None] * len(self.layers)
            self.freed: list[torch.cuda.Event | None] = [None] * len(self.buffers)
            self.checks: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
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
        if self.cuda and self.device.index is not None:
            torch.cuda.set_device(self.device)  # this thread's CUDA calls go to the worker's GPU
        if not self.cuda:  # Linux: a thread's id as the process names this thread alone
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST)
        while (i := self.todo.get()) is not None:
            b = self.free.get()
            if self.cuda:
                self._enqueue(i, b)
            else:
                for dst, src in zip(self._views(i, b), self.home[i], strict=True):
                    dst.copy_(src)
            self.slot[i] = b
            self.prefetches += 1
            self.ready[i].set()

    def _enqueue(self, i: int, b: int) -> None:
        """Layer i's copy into buffer b on the copy stream, after the buffer's last use."""
        with torch.cuda.stream(self.stream):
            freed = self.freed[b]
            if freed is not None:
                self.stream.wait_event(freed)
            for dst, src in zip(self._views(i, b), self.home[i], strict=True):
                dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event(enable_timing=True)
            done.record(self.stream)
            self.copied[i] = done

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
        if self.cuda:
            self._count_stalls()
            reached = torch.cuda.Event(enable_timing=True)
            compute = torch.cuda.current_stream(self.device)
            reached.record(compute)
            done = self.copied[i]
            assert done is not None
            compute.wait_event(done)  # on the GPU: the host goes on
            self.checks.append((reached, done))
        for p, view in zip(self.params[i], self._views(i, self.slot[i]), strict=True):
            p.data = view
        self.expected = (i + 1) % len(self.layers)

    def release(self, i: int) -> None:
        """After pooled layer i ran: its parameters back on the pool, its buffer free."""
        for p, src in zip(self.params[i], self.home[i], strict=True):
            p.data = src
        self.asked.discard(i)
        b = self.slot.pop(i)
        if self.cuda:  # the next copy into b waits for the kernels that read it
            freed = torch.cuda.Event()
            freed.record(torch.cuda.current_stream(self.device))
            self.freed[b] = freed
        self.free.put(b)

    def _count_stalls(self) -> None:
        """The GPU's stalls so far: copies done after the compute stream reached their layer."""
        left = []
        for reached, done in self.checks:
            if reached.query() and done.query():
                self.stalls += reached.elapsed_time(done) > 0
            else:
                left.append((reached, done))
        self.checks = left

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
