"""Forms micro-batches from tokenized jobs: a token budget, a maximum wait, FIFO order.

A batch holds one task (a run of same-task jobs at the head of the queue). It leaves when it is full (the next job would exceed `max_batch_tokens`), when its oldest job
has waited `max_wait_ms`, or at once when the pipeline is idle (waiting then only adds latency).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Item:
    """One job as the controller holds it: the broker's id, its tokens, and when it arrived."""

    id: str
    task: str
    ids: list[int]
    truncated: bool
    arrived: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> int:
        return len(self.ids)

    @property
    def cost(self) -> int:
        """Budget units: its tokens, and at least 1 so token-free tasks (echo) still fill batches."""
        return max(1, len(self.ids))


class Scheduler:
    def __init__(self, max_batch_tokens: int, max_wait_ms: float) -> None:
        self.budget = max_batch_tokens
        self.max_wait = max_wait_ms / 1000
        self.queue: deque[Item] = deque()
        self.tokens = 0
        self.arrived = asyncio.Event()

    def __len__(self) -> int:
        return len(self.queue)

    def add(self, items: list[Item]) -> None:
        self.queue.extend(items)
        self.tokens += sum(i.cost for i in items)
        self.arrived.set()

    def requeue(self, items: list[Item]) -> None:
        """Jobs whose batch must run again go first: they have waited longest."""
        self.queue.extendleft(reversed(items))
        self.tokens += sum(i.cost for i in items)
        self.arrived.set()

    def drop(self, ids: set[str]) -> list[Item]:
        gone = [i for i in self.queue if i.id in ids]
        if gone:
            self.queue = deque(i for i in self.queue if i.id not in ids)
            self.tokens -= sum(i.cost for i in gone)
        return gone

    async def next(self, idle: Callable[[], bool]) -> list[Item]:
        """The next batch; waits for work, then (unless the pipeline is idle) for a full batch."""
        while not self.queue:
            self.arrived.clear()
            await self.arrived.wait()
        while self.tokens < self.budget and not idle():
            left = self.queue[0].arrived + self.max_wait - time.monotonic()
            if left <= 0:
                break
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except TimeoutError:
                break
        return self.take()

    def take(self) -> list[Item]:
        out: list[Item] = []
        used = 0
        task = self.queue[0].task if self.queue else ""
        while (
            self.queue
            and self.queue[0].task == task
            and (not out or used + self.queue[0].cost <= self.budget)
        ):
            item = self.queue.popleft()
            used += item.cost
            out.append(item)
        self.tokens -= used
        return out
