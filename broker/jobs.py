"""Jobs at the broker: validation at the door, states, per-model queues, results kept for re-fetch."""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch

from broker.protocol import Code, ProtocolError

MAX_ID_CHARS = 256


class State(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL = frozenset({State.DONE, State.FAILED, State.CANCELLED})


@dataclass(slots=True)
class Job:
    id: str
    task: str
    text: str
    model: str
    state: State = State.QUEUED
    waiters: list[bytes] = field(default_factory=list)  # client identities owed the result
    controller: bytes | None = None
    entry: dict[str, Any] | None = None  # the final `results` entry
    embedding: torch.Tensor | None = None

    def wire(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "text": self.text}


@dataclass(slots=True)
class Served:
    """What one model offers: its tasks (from its controller's `ready`)."""

    tasks: frozenset[str]


_ids = itertools.count()
_prefix = f"j{os.getpid():x}-"


def new_id() -> str:
    return f"{_prefix}{next(_ids)}"


def validate(raw: Any, models: dict[str, Served], default_model: str, max_text_chars: int) -> Job:
    """One job of a `submit`, checked field by field; raises ProtocolError naming what is wrong."""
    if not isinstance(raw, dict):
        raise ProtocolError(Code.BAD_FIELD, f"a job must be a map, not {type(raw).__name__}")
    unknown = set(raw) - {"id", "task", "text", "model"}
    if unknown:
        raise ProtocolError(
            Code.BAD_FIELD, f"unknown job field(s): {', '.join(sorted(map(str, unknown)))}"
        )
    jid = raw.get("id")
    if jid is None:
        jid = new_id()
    elif not isinstance(jid, str) or not 0 < len(jid) <= MAX_ID_CHARS:
        raise ProtocolError(
            Code.BAD_FIELD, f"field 'id' must be a string of 1 to {MAX_ID_CHARS} characters"
        )
    model = raw.get("model") or default_model
    if not isinstance(model, str):
        raise ProtocolError(Code.BAD_FIELD, "field 'model' must be a string")
    task, text = raw.get("task"), raw.get("text")
    if not isinstance(task, str):
        raise ProtocolError(Code.BAD_FIELD, "field 'task' must be a string")
    if not isinstance(text, str):
        raise ProtocolError(Code.BAD_FIELD, "field 'text' must be a string")
    served = models.get(model)
    if served is None:
        known = ", ".join(sorted(models)) or "none yet"
        raise ProtocolError(Code.UNKNOWN_MODEL, f"no model {model!r} is served (serving: {known})")
    if task not in served.tasks:
        raise ProtocolError(
            Code.UNKNOWN_TASK,
            f"model {model!r} does not do task {task!r} (it does: {', '.join(sorted(served.tasks))})",
        )
    if not text.strip():
        raise ProtocolError(Code.EMPTY_TEXT, "field 'text' is empty")
    if len(text) > max_text_chars:
        raise ProtocolError(
            Code.TEXT_TOO_LONG, f"text has {len(text)} characters; at most {max_text_chars}"
        )
    return Job(jid, task, text, model)


def failure(jid: Any, code: Code, message: str) -> dict[str, Any]:
    """A `results` entry for a job that ends in an error."""
    return {"id": jid, "status": "error", "error": {"code": str(code), "message": message}}


class Table:
    """Every job the broker knows, the queue of each model, and finished jobs kept for re-fetch."""

    def __init__(self, max_queued: int, keep_finished: int = 100_000) -> None:
        self.max_queued = max_queued
        self.keep_finished = keep_finished
        self.jobs: dict[str, Job] = {}
        self.queues: dict[str, deque[str]] = {}
        self.finished: OrderedDict[str, None] = OrderedDict()
        self.counts = {"accepted": 0, "done": 0, "failed": 0, "cancelled": 0}
        self.queued = 0
        self.running = 0

    def get(self, jid: str) -> Job | None:
        return self.jobs.get(jid)

    def can_admit(self) -> bool:
        return self.queued < self.max_queued

    def add(self, job: Job) -> None:
        self.jobs[job.id] = job
        self.queues.setdefault(job.model, deque()).append(job.id)
        self.queued += 1
        self.counts["accepted"] += 1

    def pending(self, model: str) -> int:
        return len(self.queues.get(model, ()))

    def take(self, model: str, n: int, controller: bytes) -> list[Job]:
        """Up to n queued jobs of `model`, now running on `controller`; cancelled ones skipped."""
        queue = self.queues.get(model)
        out: list[Job] = []
        while queue and len(out) < n:
            job = self.jobs.get(queue.popleft())
            if job is None or job.state is not State.QUEUED:
                continue
            job.state = State.RUNNING
            job.controller = controller
            self.queued -= 1
            self.running += 1
            out.append(job)
        return out

    def finish(self, jid: str, entry: dict[str, Any], embedding: torch.Tensor | None) -> Job | None:
        """Record a job's end; None for a late or duplicate completion, which is dropped."""
        job = self.jobs.get(jid)
        if job is None or job.state is not State.RUNNING:
            return None
        self.running -= 1
        job.state = State.DONE if entry.get("status") == "ok" else State.FAILED
        self.counts["done" if job.state is State.DONE else "failed"] += 1
        job.entry, job.embedding = entry, embedding
        self._retire(job)
        return job

    def cancel(self, jid: str) -> Job | None:
        job = self.jobs.get(jid)
        if job is None or job.state in FINAL:
            return None
        if job.state is State.QUEUED:
            self.queued -= 1  # its id stays in the deque; take() skips it
        else:
            self.running -= 1
        job.state = State.CANCELLED
        job.entry = failure(jid, Code.CANCELLED, "cancelled by request")
        self.counts["cancelled"] += 1
        self._retire(job)
        return job

    def requeue(self, controller: bytes) -> int:
        """Jobs running on a controller that went away go back to the front of their queue."""
        back = [
            j for j in self.jobs.values() if j.state is State.RUNNING and j.controller == controller
        ]
        for job in reversed(back):
            job.state, job.controller = State.QUEUED, None
            self.queues.setdefault(job.model, deque()).appendleft(job.id)
        self.running -= len(back)
        self.queued += len(back)
        return len(back)

    def unfinished(self) -> Iterator[Job]:
        return (j for j in self.jobs.values() if j.state not in FINAL)

    def summary(self) -> dict[str, int]:
        return {**self.counts, "queued": self.queued, "running": self.running}

    def _retire(self, job: Job) -> None:
        # finished jobs stay fetchable by id, up to keep_finished of them, oldest dropped first
        self.finished[job.id] = None
        while len(self.finished) > self.keep_finished:
            old, _ = self.finished.popitem(last=False)
            self.jobs.pop(old, None)
