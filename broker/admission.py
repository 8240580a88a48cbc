"""Admission: what one `submit` message's jobs come to, job by job, before anything is queued.

Each job passes the checks below in order; the first that fails refuses that job alone, with a
typed error (and a retry hint where the refusal means "not now"). A job that passes is either
attached to the job already holding its id (an id is an idempotency key) or fresh: to be
journaled and queued by the broker, which keeps the loops, the journal commit and the replies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from broker import jobs as J
from broker import validation as V
from wire.protocol import ENVELOPE, Code, Limits, ProtocolError, get

# refusals that mean "not now", with when to try again
RETRY_AFTER_MS = {
    Code.BUSY: 200,
    Code.JOURNAL_UNAVAILABLE: 1000,  # about the journal's own retry period (journal.RETRY_MAX_S)
}
# an unknown model while no controller has registered yet: the fleet is starting, so the
# refusal means "not now" (a resumed batch waits on it) rather than "no such model"
STARTING_RETRY_MS = 500


@dataclass(slots=True)
class Admitted:
    """What one submit message came to."""

    ids: list[str] = field(default_factory=list)  # accepted or attached, in order
    refused: list[dict[str, Any]] = field(default_factory=list)  # `results` entries
    stored: list[J.Job] = field(default_factory=list)  # known ids whose result is kept
    fresh: list[J.Job] = field(default_factory=list)  # new jobs, to journal and queue
    seen: set[str] = field(default_factory=set)
    bytes: int = 0  # of the fresh jobs


@dataclass(slots=True)
class Admission:
    """The broker's door: its limits, its job table and journal, and whether it admits at all."""

    table: J.Table
    limits: Limits
    admitting: bool = True  # False while draining

    def submit(
        self,
        body: dict[str, Any],
        served: dict[str, V.Served],
        ident: bytes,
        owner: str | None,
    ) -> Admitted:
        """Every job of a submit `body`, each accepted, attached or refused. Raises
        ProtocolError only for a message that is wrong as a whole."""
        raw = _jobs(body, self.limits)
        # one journal query for every finished id it no longer holds in memory
        self.table.recall(
            [i["id"] for i in raw if isinstance(i, dict) and isinstance(i.get("id"), str)]
        )
        out = Admitted()
        for item in raw:
            try:
                self._admit(item, served, ident, owner, out)
            except ProtocolError as e:
                entry = refusal(item, e)
                if e.code == Code.UNKNOWN_MODEL and not served:
                    entry["error"]["retry_after_ms"] = STARTING_RETRY_MS
                out.refused.append(entry)
        return out

    def _admit(
        self,
        item: Any,
        served: dict[str, V.Served],
        ident: bytes,
        owner: str | None,
        out: Admitted,
    ) -> None:
        job = V.validate(item, served, next(iter(served), ""), self.limits)
        once_in_message(job, out)
        self.open()
        out.seen.add(job.id)
        job.owner = owner
        known = self.table.jobs.get(job.id)
        if known is not None:
            attach(known, job, ident, out)
            return
        durable(self.table)
        # clients share the queue per key where keys are required, otherwise per connection
        job.client = owner.encode() if owner else ident
        job.size = job.measure()
        fits(job, self.limits)
        room(job, self.table, self.limits, out)
        job.waiters.append(ident)
        out.fresh.append(job)
        out.bytes += job.size
        out.ids.append(job.id)

    def open(self) -> None:
        if not self.admitting:
            raise ProtocolError(Code.SHUTTING_DOWN, "the broker is draining and admits no new jobs")


def _jobs(body: dict[str, Any], limits: Limits) -> list[Any]:
    raw = get(body, "jobs", list)
    if len(raw) > limits.max_jobs_per_message:
        raise ProtocolError(
            Code.BAD_FIELD,
            f"{len(raw)} jobs in one submit; at most {limits.max_jobs_per_message}",
        )
    return raw


def once_in_message(job: J.Job, out: Admitted) -> None:
    if job.id in out.seen:
        raise ProtocolError(Code.DUPLICATE_ID, f"id {job.id!r} appears twice in this submit")


def attach(known: J.Job, job: J.Job, ident: bytes, out: Admitted) -> None:
    """A job whose id is held: the same work from the same sender waits for (or gets) the held
    job's result; anything else is refused."""
    if not J.same_job(known, job):
        # an id is an idempotency key, not a way to read or join someone else's job
        raise ProtocolError(Code.DUPLICATE_ID, J.taken(job.id))
    if known.state in J.FINAL:
        out.stored.append(known)
    elif ident not in known.waiters:
        known.waiters.append(ident)
    out.ids.append(job.id)


def durable(table: J.Table) -> None:
    """A new job cannot be made durable while the journal fails: refuse it, do not promise."""
    journal = table.journal
    if not journal.ok:
        raise ProtocolError(
            Code.JOURNAL_UNAVAILABLE,
            f"the journal cannot be written ({journal.error}); retry later",
        )


def fits(job: J.Job, limits: Limits) -> None:
    """A job that could never be handed to a controller in one message is refused now."""
    most = limits.max_message_bytes - ENVELOPE
    if job.size > most:
        raise ProtocolError(
            Code.TOO_LARGE, f"the job takes {job.size} bytes; one message carries {most}"
        )


def room(job: J.Job, table: J.Table, limits: Limits, out: Admitted) -> None:
    """The queue's bounds, in jobs and in bytes, counting this message's earlier fresh jobs."""
    if (
        table.queued + len(out.fresh) >= limits.max_queued
        or table.queued_bytes + out.bytes + job.size > limits.max_queued_bytes
    ):
        raise ProtocolError(Code.BUSY, "the queue is full; retry later")


def refusal(item: Any, e: ProtocolError) -> dict[str, Any]:
    """The `results` entry refusing one job, with a retry hint where it means "not now"."""
    jid = item.get("id") if isinstance(item, dict) else None
    entry = J.failure(jid if isinstance(jid, str) else None, e.code, e.message)
    if e.code in RETRY_AFTER_MS:
        entry["error"]["retry_after_ms"] = RETRY_AFTER_MS[e.code]
    return entry
