"""Jobs at the broker: states, per-model queues, results kept for re-fetch (validation at the door:
broker/validation.py)."""

from __future__ import annotations

import heapq
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch

from broker.buckets import LATENCY_BUCKETS, Buckets, seconds
from broker.journal import Journal, Row
from wire.protocol import DTYPES, Code, job_size

# while more urgent jobs wait, one job in this many is still taken from the next priority
STARVE = 8
DIGEST_PAST = 256  # finished jobs keep prompts up to this long; a digest of longer ones


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
    deadline: float | None = None  # wall-clock seconds
    attempts: int = 0  # runs lost to a dead worker or controller so far
    priority: int = 0  # 0 first; higher numbers wait for lower ones (validation.MAX_PRIORITY)
    controller: bytes | None = None
    entry: dict[str, Any] | None = None  # the final `results` entry
    embedding: torch.Tensor | None = None
    client: bytes = b""  # whose share of the queue it is served from (fairness between clients)
    size: int = 0  # bytes it takes in a `jobs` message (protocol.job_size); set when queued
    # of the job's content, kept instead of a long prompt once finished; None while it is kept
    digest: int | None = None
    owner: str | None = None  # the CURVE key (z85) that submitted it; None on an open endpoint
    token_ids: list[int] | None = None  # a generate job's prompt, when given as tokens
    # a generate job's sampling fields, defaults filled in; an embed job's {"dtype"} if asked
    params: dict[str, Any] | None = None
    # monotonic seconds: accepted here (or read back from the journal at start), last handed
    # to a controller; with the controller's wait, its queue time
    accepted_at: float = field(default_factory=time.monotonic)
    taken_at: float = 0.0

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "task": self.task,
            "deadline": self.deadline,
            "attempts": self.attempts,
        }
        if self.token_ids is not None:
            out["token_ids"] = self.token_ids
        else:
            out["text"] = self.text
        if self.params is not None:
            out["params"] = self.params
        if self.priority:
            out["priority"] = self.priority
        return out

    @property
    def vector_dtype(self) -> torch.dtype:
        """What its vector is kept, journaled and sent as: float32 unless the job asked."""
        return DTYPES[(self.params or {}).get("dtype", "float32")]

    def measure(self) -> int:
        """Its bytes in a `jobs` message (protocol.job_size of what wire() sends)."""
        return job_size(self.id, self.text, self.token_ids, self.params)


def new_id() -> str:
    # 128 random bits: a broker-made id is a capability, so it must not be guessable
    return secrets.token_hex(16)


def same_job(known: Job, job: Job) -> bool:
    """Whether `job` may reuse `known`'s id: the same sender asking for the same work."""
    if known.owner != job.owner or known.task != job.task or known.model != job.model:
        return False
    if known.digest is not None:  # finished, and its prompt no longer kept
        return known.digest == digest(job)
    return (known.text, known.token_ids, known.params) == (job.text, job.token_ids, job.params)


def taken(jid: str) -> str:
    # one message whether the content or the sender differs: it says no more than that the id
    # is in use
    return f"id {jid!r} is already used by a different job; pick another id"


def digest(job: Job) -> int:
    """What identifies a job's content, so a resubmitted id can be told retry from conflict.

    Python's own hash: SipHash keyed at random per process, so no client can aim for a
    collision, and digests live only in this process's memory."""
    tokens = tuple(job.token_ids) if job.token_ids is not None else None
    params = None
    if job.params is not None:
        params = tuple(
            (k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(job.params.items())
        )
    return hash((job.task, job.model, job.text, tokens, params))


def failure(jid: Any, code: Code, message: str) -> dict[str, Any]:
    """A `results` entry for a job that ends in an error."""
    return {"id": jid, "status": "error", "error": {"code": str(code), "message": message}}


class Table:
    """Every job the broker holds, the queue of each model, and recently finished jobs.

    The journal sees every change that must survive a restart: acceptance, the end, and lost
    attempts. Finished jobs stay in memory up to `keep_finished`; older ones are read back from
    the journal when their id is submitted again. Each model's queue is kept per priority (0
    first), and within one per client, served round-robin, so one client's backlog does not hold
    back another client's jobs.
    """

    def __init__(self, journal: Journal, max_attempts: int, keep_finished: int = 10_000) -> None:
        self.journal = journal
        self.max_attempts, self.keep_finished = max_attempts, keep_finished
        self.jobs: dict[str, Job] = {}
        # model -> priority -> client -> that client's queued ids, clients in round-robin order
        self.queues: dict[str, dict[int, OrderedDict[bytes, deque[str]]]] = {}
        self.served: dict[str, int] = {}  # jobs taken per model (for `_level`'s turns)
        self.waiting: dict[str, int] = {}  # queued jobs per model
        self.finished: OrderedDict[str, None] = OrderedDict()
        self.deadlines: list[tuple[float, str]] = []  # heap of queued jobs' deadlines
        self.timed = 0  # queued jobs with a deadline: the heap is rebuilt when it holds far more
        # since the broker started; `retried`: runs lost to a dead worker or controller and queued
        # again (each job may count more than once)
        self.counts = {"accepted": 0, "done": 0, "failed": 0, "cancelled": 0, "retried": 0}
        # seconds from acceptance to the controller first scheduling the run that answered
        self.queue_time = Buckets(LATENCY_BUCKETS)
        self.queued = 0
        self.queued_bytes = 0
        self.running = 0

    def recover(self) -> int:
        """Queue every job the journal holds unfinished (a previous run accepted them)."""
        n = 0
        for row in self.journal.unfinished():
            job = Job(
                row.id,
                row.task,
                row.text,
                row.model,
                deadline=row.deadline,
                attempts=row.attempts,
                priority=row.priority,
            )
            job.owner, job.token_ids, job.params = row.owner, row.token_ids, row.params
            self._enqueue(job)
            n += 1
        return n

    def get(self, jid: str) -> Job | None:
        if jid not in self.jobs:
            self.recall([jid])
        return self.jobs.get(jid)

    def recall(self, ids: list[str]) -> None:
        """Bring finished jobs the memory no longer holds back from the journal (one query)."""
        missing = [i for i in ids if i not in self.jobs]
        if not missing:
            return
        for jid, row in self.journal.lookup(missing).items():
            if row.state != "queued":  # queued ones are all in memory already
                job = _finished(row)
                self.jobs[jid] = job
                self._retire(job)

    def add(self, jobs: list[Job]) -> None:
        self.journal.add(
            [
                (
                    j.id,
                    j.model,
                    j.task,
                    j.text,
                    j.deadline,
                    j.owner,
                    j.token_ids,
                    j.params,
                    j.priority,
                )
                for j in jobs
            ]
        )
        for job in jobs:
            self._enqueue(job)
        self.counts["accepted"] += len(jobs)

    def _enqueue(self, job: Job, front: bool = False) -> None:
        self.jobs[job.id] = job
        if not job.size:
            job.size = job.measure()
        levels = self.queues.setdefault(job.model, {})
        clients = levels.get(job.priority)
        if clients is None:
            clients = levels[job.priority] = OrderedDict()
        queue = clients.get(job.client)
        if queue is None:
            queue = clients[job.client] = deque()
        if front:
            queue.appendleft(job.id)
            clients.move_to_end(job.client, last=False)  # a retried job has waited longest
        else:
            queue.append(job.id)
        self.waiting[job.model] = self.waiting.get(job.model, 0) + 1
        self.queued += 1
        self.queued_bytes += job.size
        if job.deadline is not None:
            self.timed += 1
            heapq.heappush(self.deadlines, (job.deadline, job.id))

    def pending(self, model: str, priority: int | None = None) -> int:
        """Jobs of `model` queued (of one `priority`: whether any may be)."""
        if priority is None:
            return self.waiting.get(model, 0)
        return int(priority in self.queues.get(model, ()))

    def take(
        self,
        model: str,
        n: int,
        controller: bytes,
        nbytes: int | None = None,
        priority: int | None = None,
    ) -> list[Job]:
        """Up to n queued jobs of `model`, now running on `controller`: the most urgent priority
        first (see `_level`), or only of `priority` when given, one from each client in turn,
        ended ones skipped. Given `nbytes`, the jobs after the first fit within it (the first is
        always taken, so that any positive credit moves the queue)."""
        levels = self.queues.get(model)
        out: list[Job] = []
        left = nbytes
        now = time.monotonic()
        full = False
        while levels and len(out) < n and not full:
            if priority is None:
                level = self._level(model, levels)
            elif priority in levels:
                level = priority
            else:
                break
            clients = levels[level]
            client, queue = next(iter(clients.items()))
            # a client's turn is one job while others wait (clients, or other priorities), and
            # the rest when it is alone
            turn = 1 if len(clients) > 1 or len(levels) > 1 else n - len(out)
            while queue and turn:
                job = self.jobs.get(queue[0])
                if job is None or job.state is not State.QUEUED:
                    queue.popleft()  # cancelled or expired while queued: already counted out
                    continue
                if left is not None and out and job.size > left:
                    full = True
                    break
                queue.popleft()
                self._unqueue(job)
                job.state = State.RUNNING
                job.controller = controller
                job.taken_at = now
                out.append(job)
                turn -= 1
                self.served[model] = self.served.get(model, 0) + 1
                if left is not None:
                    left -= job.size
            if not queue:
                del clients[client]
                if not clients:
                    del levels[level]
            elif len(clients) > 1 and not full:
                clients.move_to_end(client)
        self.running += len(out)
        return out

    def _level(self, model: str, levels: dict[int, OrderedDict[bytes, deque[str]]]) -> int:
        """The most urgent priority waiting, but every STARVE-th job from the next one: later
        work is slowed while more urgent work waits, never stopped."""
        if len(levels) == 1:
            return next(iter(levels))
        first, second = heapq.nsmallest(2, levels)
        return second if self.served.get(model, 0) % STARVE == STARVE - 1 else first

    def finish(
        self,
        jid: str,
        entry: dict[str, Any],
        embedding: torch.Tensor | None,
        controller: bytes | None,
    ) -> Job | None:
        """Record a job's end; None for a late or duplicate completion, which is dropped. The
        controller's `queued_s` (its wait before it first scheduled the job) leaves the entry
        here, counted into `queue_time` once per job, never sent on or journaled."""
        waited = seconds(entry.pop("queued_s", None))
        job = self.jobs.get(jid)
        if (
            job is None
            or job.state is not State.RUNNING
            or (controller and job.controller != controller)
        ):
            return None
        self.running -= 1
        if waited is not None:
            # the broker's part is in its own clock, the controller's in its: durations only
            self.queue_time.observe(job.taken_at - job.accepted_at + waited)
        self._end(job, entry, embedding)
        return job

    def cancel(self, jid: str) -> Job | None:
        job = self.jobs.get(jid)
        if job is None or job.state in FINAL:
            return None
        self._leave(job)
        self._end(job, failure(jid, Code.CANCELLED, "cancelled by request"), None)
        return job

    def expire(self, now: float) -> list[Job]:
        """Queued jobs past their deadline fail without using the model."""
        out = []
        while self.deadlines and self.deadlines[0][0] <= now:
            _, jid = heapq.heappop(self.deadlines)
            job = self.jobs.get(jid)
            if job is not None and job.state is State.QUEUED:
                self._leave(job)
                self._end(
                    job, failure(jid, Code.DEADLINE, "the deadline passed before the job ran"), None
                )
                out.append(job)
        return out

    def requeue(
        self, controller: bytes, cause: str, ids: list[str] | None = None
    ) -> tuple[int, list[Job]]:
        """Jobs running on a controller that went away (or only `ids` of them): back to the
        front of their queue, or failed if this was their last attempt. Returns (requeued,
        failed)."""
        if ids is None:
            back = [
                j
                for j in self.jobs.values()
                if j.state is State.RUNNING and j.controller == controller
            ]
        else:
            held = (self.jobs.get(i) for i in ids)
            back = [
                j
                for j in held
                if j is not None and j.state is State.RUNNING and j.controller == controller
            ]
        failed: list[Job] = []
        again: list[Job] = []
        for job in back:
            job.attempts += 1
            self.running -= 1
            if job.attempts >= self.max_attempts:
                why = f"{job.attempts} attempts lost ({cause})"
                self._end(job, failure(job.id, Code.RETRIES_EXHAUSTED, why), None)
                failed.append(job)
            else:
                again.append(job)
        self.journal.attempt([j.id for j in again], [j.attempts for j in again])
        self.counts["retried"] += len(again)
        for job in reversed(again):
            job.state, job.controller = State.QUEUED, None
            self._enqueue(job, front=True)
        return len(again), failed

    def summary(self) -> dict[str, int]:
        return {
            **self.counts,
            "queued": self.queued,
            "queued_bytes": self.queued_bytes,
            "running": self.running,
        }

    def _unqueue(self, job: Job) -> None:
        self.queued -= 1
        self.queued_bytes -= job.size
        self.waiting[job.model] -= 1
        if job.deadline is not None:
            self.timed -= 1
            # entries of jobs that left the queue stay in the heap until they come due; rebuild
            # it when they dominate, so it does not grow with finished work
            if len(self.deadlines) > 2 * self.timed + 1024:
                self.deadlines = [
                    (j.deadline, j.id)
                    for j in self.jobs.values()
                    if j.state is State.QUEUED and j.deadline is not None and j is not job
                ]
                heapq.heapify(self.deadlines)

    def _leave(self, job: Job) -> None:
        if job.state is State.QUEUED:
            self._unqueue(job)  # its id stays in its client's deque; take() skips it
        else:
            self.running -= 1

    def _end(self, job: Job, entry: dict[str, Any], embedding: torch.Tensor | None) -> None:
        job.state = {"ok": State.DONE}.get(entry.get("status"), State.FAILED)
        if entry.get("error", {}).get("code") == Code.CANCELLED:
            job.state = State.CANCELLED
        self.counts[job.state.value] += 1
        if embedding is not None:
            embedding = embedding.to(job.vector_dtype)
        job.entry, job.embedding, job.controller = entry, embedding, None
        self.journal.finish(job.id, job.state.value, entry, embedding)
        self._retire(job)

    def _retire(self, job: Job) -> None:
        # finished jobs stay in memory up to keep_finished, oldest dropped first (the journal
        # still has them until their TTL); a finished job's long prompt is not kept in memory
        if len(job.text) > DIGEST_PAST or len(job.token_ids or ()) > DIGEST_PAST:
            job.digest, job.text, job.token_ids = digest(job), "", None
        self.finished[job.id] = None
        while len(self.finished) > self.keep_finished:
            old, _ = self.finished.popitem(last=False)
            self.jobs.pop(old, None)


def _finished(row: Row) -> Job:
    state = State(row.state)
    job = Job(
        row.id, row.task, row.text, row.model, state=state, entry=row.entry, embedding=row.embedding
    )
    job.owner, job.token_ids, job.params = row.owner, row.token_ids, row.params
    return job
