"""Client side of the client <-> broker protocol: an asyncio Client and a blocking wrapper.

One DEALER socket; a background task reads every reply. Direct replies (accepted, status,
cancelled, pong, error) are matched by the `ref` this client puts on each request; `results`
entries are matched by job id to per-job futures, so any number of submits can be in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from wire.protocol import Code, Kind, Limits, Message, ProtocolError, encode
from wire.transport import Peer, client_keys, serve

log = logging.getLogger("baton.client")

REPLY_KINDS = frozenset({Kind.ACCEPTED, Kind.STATUS, Kind.CANCELLED, Kind.PONG, Kind.ERROR})
CHUNK = 256  # jobs per submit message; well under the broker's max_jobs_per_message
SPLIT_ON = frozenset({Code.TOO_LARGE, Code.TOO_MANY_FRAMES})  # refusals of size, not of content
# refusals that say "not now": the job is sent again after the hinted delay
RETRY_ON = frozenset({Code.BUSY, Code.JOURNAL_UNAVAILABLE})
BUSY_ATTEMPTS = 8
BUSY_BASE_S = 0.05
BUSY_CAP_S = 5.0


@dataclass(slots=True)
class Result:
    id: str
    status: str  # "ok" | "error"
    embedding: list[float] | None = None
    tokens: int = 0
    truncated: bool = False
    error: dict | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict:
        """The CLI's output row."""
        if self.ok:
            return {
                "id": self.id,
                "status": "ok",
                "embedding": self.embedding,
                "tokens": self.tokens,
                "truncated": self.truncated,
            }
        return {"id": self.id, "status": "error", "error": self.error}


def failure(job_id: str, code: str, message: str) -> Result:
    return Result(job_id, "error", error={"code": str(code), "message": message})


@dataclass(slots=True)
class _Job:
    body: dict[str, Any]  # what goes on the wire, kept for busy retries
    size: int = 0  # its encoded bytes, roughly: chunks are bounded by it
    futures: list[asyncio.Future[Result]] = field(default_factory=list)
    attempts: int = 0


class Client:
    """`curve_key` (our secret certificate file) and `server_key` (the broker's public
    certificate file, or its z85 public key) are for a broker that requires keys
    (`endpoints.client_keys`); made by `baton keys`. Without them the connection is plain."""

    def __init__(
        self,
        endpoint: str,
        *,
        limits: Limits | None = None,
        timeout_s: float = 60,
        curve_key: str | Path | None = None,
        server_key: str | Path | bytes | None = None,
    ) -> None:
        if (curve_key is None) != (server_key is None):
            raise ValueError("curve_key and server_key go together: give both or neither")
        self.endpoint = endpoint
        self.curve_key, self.server_key = curve_key, server_key
        self.limits = limits or Limits()
        self.timeout_s = timeout_s
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None
        self._refs = itertools.count(1)
        self._replies: dict[int, asyncio.Future[Message]] = {}
        self._jobs: dict[str, _Job] = {}
        self._retries: set[asyncio.Task] = set()

    async def __aenter__(self) -> Client:
        self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        if self._sock is not None:
            return
        # a private context: nothing global is created or shared
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        self._sock.setsockopt(zmq.MAXMSGSIZE, 4 * self.limits.max_message_bytes)
        if self.curve_key is not None and self.server_key is not None:
            server = self.server_key if isinstance(self.server_key, bytes) else str(self.server_key)
            client_keys(self._sock, str(self.curve_key), server)
        self._sock.connect(self.endpoint)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    def close(self) -> None:
        for task in (self._reader, *self._retries):
            if task is not None:
                task.cancel()
        self._retries.clear()
        for fut in self._replies.values():
            fut.cancel()
        self._replies.clear()
        for job in self._jobs.values():
            for fut in job.futures:
                fut.cancel()
        self._jobs.clear()
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # --- requests ---

    async def submit(self, jobs: Iterable[dict]) -> list[asyncio.Future[Result]]:
        """Send jobs; returns one future per job, resolved when its `results` entry arrives."""
        futures: list[asyncio.Future[Result]] = []
        fresh: list[dict] = []
        loop = asyncio.get_running_loop()
        for job in jobs:
            body = dict(job)
            # ids are ours to pick: a broker-made id could not be matched to a refusal
            job_id = body.get("id") or body.setdefault("id", uuid.uuid4().hex)
            fut: asyncio.Future[Result] = loop.create_future()
            futures.append(fut)
            if job_id in self._jobs:  # still in flight: the broker would attach it to the first
                self._jobs[job_id].futures.append(fut)
                continue
            size = _wire_size(body)
            if isinstance(size, str):  # it cannot be sent: it fails alone, the rest go on
                fut.set_result(failure(job_id, Code.BAD_FIELD, size))
                continue
            self._jobs[job_id] = _Job(body, size, [fut])
            fresh.append(body)
        await asyncio.gather(*(self._send_jobs(c) for c in self._chunks(fresh)))
        return futures

    async def embed(self, texts: list[str], task: str = "embed") -> list[Result]:
        futures = await self.submit({"task": task, "text": t} for t in texts)
        await self._progress(set(futures))
        return [f.result() for f in futures]

    async def run(
        self, jobs: AsyncIterable[dict] | Iterable[dict], window: int = 512
    ) -> AsyncIterator[Result]:
        """Stream jobs through with at most `window` outstanding; yields results as they finish."""
        source = _aiter(jobs)
        # top up in chunks, not one job per finished result
        refill = max(1, min(CHUNK, window // 4))
        pending: set[asyncio.Future[Result]] = set()
        exhausted = False
        while True:
            free = window - len(pending)
            if not exhausted and (free >= refill or not pending):
                batch = []
                while len(batch) < free:
                    try:
                        batch.append(await anext(source))
                    except StopAsyncIteration:
                        exhausted = True
                        break
                if batch:
                    pending.update(await self.submit(batch))
            if not pending:
                return
            done, pending = await self._progress(pending, first=True)
            for fut in done:
                yield fut.result()

    async def status(self) -> dict:
        return (await self._request(Kind.STATUS)).body

    async def cancel(self, ids: list[str]) -> dict:
        body = (await self._request(Kind.CANCEL, {"ids": list(ids)})).body
        return {"ids": body.get("ids", []), "unknown": body.get("unknown", [])}

    async def ping(self) -> float:
        """Round-trip seconds."""
        t0 = time.perf_counter()
        await self._request(Kind.PING)
        return time.perf_counter() - t0

    # --- internals ---

    def _chunks(self, bodies: list[dict]) -> Iterator[list[dict]]:
        # bounded by count and by bytes, so a chunk of long texts does not hit too_large
        budget = self.limits.max_message_bytes // 2
        chunk: list[dict] = []
        size = 0
        for body in bodies:
            job = self._jobs.get(body["id"])
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
            reply = await self._request(Kind.SUBMIT, {"jobs": bodies}, check=False)
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
                self._settle(failure(b["id"], code, message))

    async def _request(
        self, kind: Kind, body: dict | None = None, *, check: bool = True
    ) -> Message:
        if self._sock is None:
            raise RuntimeError("client is not open; use `async with Client(...)`")
        ref = next(self._refs)
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._replies[ref] = fut
        try:
            await self._sock.send_multipart(encode(kind, {**(body or {}), "ref": ref}))
            try:
                reply = await asyncio.wait_for(fut, self.timeout_s)
            except TimeoutError:
                raise TimeoutError(
                    f"no reply to {kind} from the broker at {self.endpoint} "
                    f"within {self.timeout_s:g} s"
                ) from None
        finally:
            self._replies.pop(ref, None)
        if check and reply.kind == Kind.ERROR:
            raise _refusal(reply.body)
        return reply

    async def _progress(
        self, pending: set[asyncio.Future[Result]], first: bool = False
    ) -> tuple[set, set]:
        """Wait for results; time out only when none arrives for timeout_s."""
        done: set = set()
        while pending:
            got, pending = await asyncio.wait(
                pending, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if not got:
                raise TimeoutError(
                    f"{len(pending)} jobs outstanding and no result from the broker at "
                    f"{self.endpoint} within {self.timeout_s:g} s"
                )
            done |= got
            if first:
                break
        return done, pending

    async def _read(self) -> None:
        assert self._sock is not None
        # a message that cannot be decoded has nothing sane to route it to: it is dropped, and
        # the waiter's timeout bounds the loss
        await serve(
            self._sock,
            self.limits,
            {Kind.RESULTS: self._results, **dict.fromkeys(REPLY_KINDS, self._reply)},
            log=log,
        )

    def _reply(self, _peer: Peer, msg: Message) -> None:
        ref = msg.body.pop("ref", None)
        fut = self._replies.get(ref) if isinstance(ref, int) else None
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def _results(self, _peer: Peer, msg: Message) -> None:
        entries = msg.body.get("results")
        if not isinstance(entries, list):
            return
        entries = [e for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)]
        rows = msg.tensors[0] if msg.tensors else None
        n_rows = len(rows) if rows is not None and rows.dim() == 2 else 0
        busy: list[tuple[str, Any]] = []
        for e in entries:
            job_id = e["id"]
            if e.get("status") == "ok":
                k = e.get("row")  # jobs whose task yields a vector name their row; others have none
                row = None
                if k is not None:
                    if not (isinstance(k, int) and 0 <= k < n_rows):
                        self._settle(
                            failure(job_id, Code.INTERNAL, f"results row {k!r} is missing")
                        )
                        continue
                    row = rows[k].tolist()
                tokens = e.get("tokens")
                self._settle(
                    Result(
                        job_id,
                        "ok",
                        row,
                        tokens if isinstance(tokens, int) else 0,
                        bool(e.get("truncated", False)),
                    )
                )
                continue
            err = e.get("error") if isinstance(e.get("error"), dict) else {}
            code = str(err.get("code", Code.INTERNAL))
            job = self._jobs.get(job_id)
            if code in RETRY_ON and job is not None and job.attempts < BUSY_ATTEMPTS:
                busy.append((job_id, err.get("retry_after_ms", e.get("retry_after_ms"))))
                continue
            self._settle(failure(job_id, code, str(err.get("message", ""))))
        if busy:
            self._retry(busy)

    def _retry(self, busy: list[tuple[str, Any]]) -> None:
        attempts = max(self._jobs[i].attempts for i, _ in busy)
        hints = [h / 1000 for _, h in busy if isinstance(h, int | float) and h > 0]
        backoff = BUSY_BASE_S * 2**attempts * random.uniform(1.0, 1.25)
        delay = min(BUSY_CAP_S, max([backoff, *hints]))
        for job_id, _ in busy:
            self._jobs[job_id].attempts += 1
        bodies = [self._jobs[i].body for i, _ in busy]
        task = asyncio.get_running_loop().create_task(self._resend(bodies, delay))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _resend(self, bodies: list[dict], delay: float) -> None:
        await asyncio.sleep(delay)  # backoff the broker asked for, not synchronisation
        live = [b for b in bodies if b["id"] in self._jobs]
        try:
            await asyncio.gather(*(self._send_jobs(c) for c in self._chunks(live)))
        except TimeoutError as e:
            for b in live:
                job = self._jobs.pop(b["id"], None)
                for fut in job.futures if job else ():
                    if not fut.done():
                        fut.set_exception(TimeoutError(str(e)))

    def _settle(self, result: Result) -> None:
        job = self._jobs.pop(result.id, None)
        for fut in job.futures if job else ():
            if not fut.done():
                fut.set_result(result)

    def _forget(self, ids: Iterable[str]) -> None:
        for job_id in ids:
            job = self._jobs.pop(job_id, None)
            for fut in job.futures if job else ():
                fut.cancel()


def _wire_size(body: dict[str, Any]) -> int | str:
    """Bytes the job's strings take as UTF-8, or why it cannot go on the wire at all.

    A str may hold what UTF-8 cannot (a lone surrogate, e.g. from json.loads of "\\ud800");
    msgpack would raise on it and take the whole message down with it.
    """
    n = 0
    for key, value in body.items():
        if isinstance(value, int) and not -(2**63) <= value < 2**64:
            return f"field {key!r} is out of range for the wire: {value}"
        if isinstance(value, str):
            try:
                n += len(value.encode())
            except UnicodeEncodeError as e:
                return f"field {key!r} is not valid Unicode: {e.reason} at position {e.start}"
        elif not isinstance(value, int | float | bool | None):
            try:
                n += len(msgpack.packb(value))
            except (TypeError, ValueError, OverflowError) as e:  # UnicodeEncodeError included
                return f"field {key!r} cannot be sent: {e}"
    return n


def _refusal(body: dict) -> ProtocolError:
    try:
        code = Code(body.get("code"))
    except ValueError:
        code = Code.INTERNAL
    return ProtocolError(code, str(body.get("message", "")))


async def _aiter(items: AsyncIterable[dict] | Iterable[dict]) -> AsyncIterator[dict]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


class BlockingClient:
    """Client without async: owns a private event loop. `with BlockingClient(ep) as c: ...`"""

    def __init__(
        self,
        endpoint: str,
        *,
        limits: Limits | None = None,
        timeout_s: float = 60,
        curve_key: str | Path | None = None,
        server_key: str | Path | bytes | None = None,
    ) -> None:
        self._client = Client(
            endpoint,
            limits=limits,
            timeout_s=timeout_s,
            curve_key=curve_key,
            server_key=server_key,
        )
        self._loop = asyncio.new_event_loop()

    def __enter__(self) -> BlockingClient:
        self._loop.run_until_complete(self._open())
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _open(self) -> None:
        self._client.open()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._client.close()
        # let the cancelled reader and retry tasks unwind before the loop goes
        pending = asyncio.all_tasks(self._loop)
        if pending:
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def submit(self, jobs: Iterable[dict]) -> list[Result]:
        """Blocking: returns the results, not futures (nothing would run the loop for them)."""

        async def go() -> list[Result]:
            futures = await self._client.submit(jobs)
            await self._client._progress(set(futures))
            return [f.result() for f in futures]

        return self._loop.run_until_complete(go())

    def embed(self, texts: list[str], task: str = "embed") -> list[Result]:
        return self._loop.run_until_complete(self._client.embed(texts, task))

    def run(self, jobs: Iterable[dict], window: int = 512) -> Iterator[Result]:
        stream = self._client.run(jobs, window)
        try:
            while True:
                try:
                    yield self._loop.run_until_complete(anext(stream))
                except StopAsyncIteration:
                    return
        finally:
            self._loop.run_until_complete(stream.aclose())

    def status(self) -> dict:
        return self._loop.run_until_complete(self._client.status())

    def cancel(self, ids: list[str]) -> dict:
        return self._loop.run_until_complete(self._client.cancel(ids))

    def ping(self) -> float:
        return self._loop.run_until_complete(self._client.ping())
