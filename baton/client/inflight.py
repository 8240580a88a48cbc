"""The jobs a client has sent and awaits, by id: submitted in chunks cut to size, settled by
the broker's `results` entries, and sent again after a backoff when refused as "not now".

Any number of submits can be in flight: each job's future resolves when its `results` entry
arrives, whatever message carried it.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

from baton.client.link import Link
from baton.client.result import Delta, Result, failure, ok_result
from wire.protocol import Code, Kind, Message

CHUNK = 256  # jobs per submit message; well under the broker's max_jobs_per_message
SPLIT_ON = frozenset({Code.TOO_LARGE, Code.TOO_MANY_FRAMES})  # refusals of size, not of content
# refusals that say "not now": the job is sent again after the hinted delay
RETRY_ON = frozenset({Code.BUSY, Code.JOURNAL_UNAVAILABLE})
BUSY_ATTEMPTS = 8
BUSY_BASE_S = 0.05
BUSY_CAP_S = 5.0


@dataclass(slots=True)
class _Job:
    body: dict[str, Any]  # what goes on the wire, kept for busy retries
    size: int = 0  # its encoded bytes, roughly: chunks are bounded by it
    futures: list[asyncio.Future[Result]] = field(default_factory=list)
    attempts: int = 0


class Inflight:
    def __init__(self, link: Link, busy_attempts: int = BUSY_ATTEMPTS) -> None:
        self.link = link
        self.busy_attempts = busy_attempts  # 0: a "not now" refusal is the job's result
        self.jobs: dict[str, _Job] = {}
        # job id -> the queues of the streams watching it (generate_stream), fed by `tokens`
        self.streams: dict[str, list[asyncio.Queue]] = {}
        self._retries: set[asyncio.Task] = set()

    def close(self) -> None:
        for task in self._retries:
            task.cancel()
        self._retries.clear()
        for job in self.jobs.values():
            for fut in job.futures:
                fut.cancel()
        self.jobs.clear()
        self.streams.clear()

    async def submit(self, jobs: Iterable[dict]) -> list[asyncio.Future[Result]]:
        """Send jobs; returns one future per job, resolved when its `results` entry arrives."""
        futures: list[asyncio.Future[Result]] = []
        fresh: list[dict] = []
        loop = asyncio.get_running_loop()
        max_items = self.link.limits.front().max_items
        for job in jobs:
            body = dict(job)
            # ids are ours to pick: a broker-made id could not be matched to a refusal
            job_id = body.get("id") or body.setdefault("id", uuid.uuid4().hex)
            fut: asyncio.Future[Result] = loop.create_future()
            futures.append(fut)
            if job_id in self.jobs:  # still in flight: the broker would attach it to the first
                self.jobs[job_id].futures.append(fut)
                continue
            size = _wire_size(body, max_items)
            if isinstance(size, tuple):  # it cannot be sent: it fails alone, the rest go on
                fut.set_result(failure(job_id, *size))
                continue
            self.jobs[job_id] = _Job(body, size, [fut])
            fresh.append(body)
        await asyncio.gather(*(self._send_jobs(c) for c in self._chunks(fresh)))
        return futures

    def results(self, msg: Message) -> None:
        """A `results` message: each entry settles its job, or schedules a busy retry."""
        entries = msg.body.get("results")
        if not isinstance(entries, list):
            return
        entries = [e for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)]
        busy: list[tuple[str, Any]] = []
        for e in entries:
            job_id = e["id"]
            if e.get("status") == "ok":
                self.settle(ok_result(e, msg.tensors))
                continue
            err = e.get("error") if isinstance(e.get("error"), dict) else {}
            code = str(err.get("code", Code.INTERNAL))
            job = self.jobs.get(job_id)
            hint = err.get("retry_after_ms", e.get("retry_after_ms"))
            if code in RETRY_ON and job is not None and job.attempts < self.busy_attempts:
                busy.append((job_id, hint))
                continue
            self.settle(failure(job_id, code, str(err.get("message", "")), hint))
        if busy:
            self._retry(busy)

    def tokens(self, msg: Message) -> None:
        """A `tokens` message: each well-formed delta goes to the streams watching its job."""
        deltas = msg.body.get("deltas")
        for d in deltas if isinstance(deltas, list) else ():
            if not isinstance(d, dict) or not isinstance(d.get("id"), str):
                continue
            queues = self.streams.get(d["id"])
            ids, index = d.get("token_ids"), d.get("index")
            if not queues or type(index) is not int or not isinstance(ids, list):
                continue
            if not all(type(t) is int for t in ids):
                continue
            for q in queues:
                q.put_nowait(Delta(d["id"], index, ids))

    def watch(self, job_id: str, queue: asyncio.Queue) -> None:
        self.streams.setdefault(job_id, []).append(queue)

    def unwatch(self, job_id: str, queue: asyncio.Queue) -> None:
        queues = self.streams.get(job_id, [])
        if queue in queues:
            queues.remove(queue)
        if not queues:
            self.streams.pop(job_id, None)

    def settle(self, result: Result) -> None:
        job = self.jobs.pop(result.id, None)
        for fut in job.futures if job else ():
            if not fut.done():
                fut.set_result(result)

    def _chunks(self, bodies: list[dict]) -> Iterator[list[dict]]:
        # bounded by count and by bytes, so a chunk of long texts does not hit too_large
        budget = self.link.limits.max_message_bytes // 2
        chunk: list[dict] = []
        size = 0
        for body in bodies:
            job = self.jobs.get(body["id"])
            n = (job.size if job is not None else 0) + 128
            if chunk and (len(chunk) == CHUNK or size + n > budget):
                yield chunk
                chunk, size = [], 0
            chunk.append(body)
            size += n
        if chunk:
            yield chunk

    async def _send_jobs(self, bodies: list[dict]) -> None:
        """One submit message; an error reply fails every job it carried."""
        try:
            reply = await self.link.request(Kind.SUBMIT, {"jobs": bodies}, check=False)
        except BaseException:
            self._forget(b["id"] for b in bodies)
            raise
        if reply.kind == Kind.ERROR:
            code = str(reply.body.get("code", Code.INTERNAL))
            if code in SPLIT_ON and len(bodies) > 1:
                # the broker's limits may be tighter than ours: halve until only the culprit fails
                half = len(bodies) // 2
                await asyncio.gather(self._send_jobs(bodies[:half]), self._send_jobs(bodies[half:]))
                return
            message = str(reply.body.get("message", ""))
            for b in bodies:
                self.settle(failure(b["id"], code, message))

    def _retry(self, busy: list[tuple[str, Any]]) -> None:
        attempts = max(self.jobs[i].attempts for i, _ in busy)
        hints = [h / 1000 for _, h in busy if isinstance(h, int | float) and h > 0]
        backoff = BUSY_BASE_S * 2**attempts * random.uniform(1.0, 1.25)
        delay = min(BUSY_CAP_S, max([backoff, *hints]))
        for job_id, _ in busy:
            self.jobs[job_id].attempts += 1
        bodies = [self.jobs[i].body for i, _ in busy]
        task = asyncio.get_running_loop().create_task(self._resend(bodies, delay))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _resend(self, bodies: list[dict], delay: float) -> None:
        await asyncio.sleep(delay)  # backoff the broker asked for, not synchronisation
        live = [b for b in bodies if b["id"] in self.jobs]
        try:
            await asyncio.gather(*(self._send_jobs(c) for c in self._chunks(live)))
        except TimeoutError as e:
            for b in live:
                job = self.jobs.pop(b["id"], None)
                for fut in job.futures if job else ():
                    if not fut.done():
                        fut.set_exception(TimeoutError(str(e)))

    def _forget(self, ids: Iterable[str]) -> None:
        for job_id in ids:
            job = self.jobs.pop(job_id, None)
            for fut in job.futures if job else ():
                fut.cancel()


def _wire_size(body: dict[str, Any], max_items: int) -> int | tuple[Code, str]:
    """Bytes the job's strings take as UTF-8, or why it cannot go on the wire at all (a code
    and a message).

    A str may hold what UTF-8 cannot (a lone surrogate, e.g. from json.loads of "\\ud800");
    msgpack would raise on it and take the whole message down with it. A list longer than the
    broker reads (a prompt's token ids past limits.max_text_chars) would have the whole submit
    refused before its `ref` is read, an error no request could be matched to.
    """
    n = 0
    for key, value in body.items():
        if isinstance(value, list) and len(value) > max_items:
            return Code.TOO_MANY_ITEMS, f"field {key!r} has {len(value)} items; at most {max_items}"
        if isinstance(value, int) and not -(2**63) <= value < 2**64:
            return Code.BAD_FIELD, f"field {key!r} is out of range for the wire: {value}"
        if isinstance(value, str):
            try:
                n += len(value.encode())
            except UnicodeEncodeError as e:
                why = f"field {key!r} is not valid Unicode: {e.reason} at position {e.start}"
                return Code.BAD_FIELD, why
        elif not isinstance(value, int | float | bool | None):
            try:
                n += len(msgpack.packb(value))
            except (TypeError, ValueError, OverflowError) as e:  # UnicodeEncodeError included
                return Code.BAD_FIELD, f"field {key!r} cannot be sent: {e}"
    return n
