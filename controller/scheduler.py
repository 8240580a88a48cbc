"""Forms micro-batches from tokenized jobs: a token budget, a maximum wait, FIFO order.

A batch holds one task (a run of same-task jobs at the head of the queue); a job whose earlier run
was lost with a dying worker runs alone, so a job that kills workers cannot take its neighbours'
attempts with it. Jobs past their deadline are set aside (`late`) instead. A batch leaves when it is full (the next job would exceed `max_batch_tokens`), when its oldest job
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
    attempts: int = 0  # runs lost before this one; > 0 marks a suspect that runs alone
    deadline: float | None = None  # wall-clock seconds
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
        self.late: list[Item] = []  # past their deadline; the controller fails them

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

    def clear(self) -> list[Item]:
        """Everything queued here, taken out (the broker has put these jobs back in its queue)."""
        gone = list(self.queue)
        self.queue.clear()
        self.tokens = 0
        return gone

    async def next(self, idle: Callable[[], bool]) -> list[Item]:
        """The next batch; waits for work, then (unless the pipeline is idle) for a full batch."""
        while True:
            while not self.queue:
                self.arrived.clear()
                await self.arrived.wait()
            batch = await self._fill(idle)
            if batch:
                return batch

    async def _fill(self, idle: Callable[[], bool]) -> list[Item]:
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
        now = time.time()
        task = self.queue[0].task if self.queue else ""
        while self.queue and self.queue[0].task == task:
            item = self.queue[0]
            if out and (item.attempts or out[0].attempts or used + item.cost > self.budget):
                break
            self.queue.popleft()
            self.tokens -= item.cost
            if item.deadline is not None and item.deadline <= now:
                self.late.append(item)
            else:
                out.append(item)
                used += item.cost
        return out
