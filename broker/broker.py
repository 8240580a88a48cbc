"""The broker: the front door for clients and the dispatcher to controllers (Majordomo style).

Two ROUTER sockets. Clients (DEALER) submit, query status and cancel on the front; controllers
(DEALER) register on the back with `ready`, ask for work with `credit`, and return `results`.
Every job is validated at the door, refused with a typed error or accepted into its model's
queue, and its result is routed back to every client waiting on that id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq
import zmq.asyncio

from broker import jobs as J
from broker.journal import Journal
from broker.protocol import (
    CLIENT_KINDS,
    CONTROLLER_KINDS,
    Code,
    Kind,
    Limits,
    Message,
    ProtocolError,
    decode,
    encode,
    error,
    get,
)
from broker.transport import configure, recv_batch, send

log = logging.getLogger("baton.broker")

BUSY_RETRY_MS = 200
JOURNAL_RETRY_MS = 1000  # about the journal's own retry period (journal.RETRY_MAX_S)


@dataclass(slots=True)
class Admission:
    max_jobs_per_message: int = 1024
    max_text_chars: int = 100_000
    max_queued: int = 100_000
    max_attempts: int = 3


@dataclass(slots=True)
class Controller:
    ident: bytes
    model: str
    tasks: frozenset[str]
    layout: dict[str, int]
    workers: list[dict[str, Any]] = field(default_factory=list)
    pid: int | None = None
    state: str = "ready"
    stats: dict[str, int] = field(default_factory=dict)
    credit: int = 0
    seen: float = field(default_factory=time.monotonic)


class Broker:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        client_endpoint: str,
        journal: Journal,
        limits: Limits | None = None,
        admission: Admission | None = None,
        heartbeat_s: float = 1.0,
        dead_after_s: float = 10.0,
    ) -> None:
        self.limits, self.admission = limits or Limits(), admission or Admission()
        limits = self.limits
        self.heartbeat_s, self.dead_after_s = heartbeat_s, dead_after_s
        self.front = ctx.socket(zmq.ROUTER)
        configure(self.front, limits, mandatory=True)
        self.front.bind(client_endpoint)
        self.endpoint = self.front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.back = ctx.socket(zmq.ROUTER)
        configure(self.back, limits, mandatory=True)
        self.back.bind("tcp://127.0.0.1:*")
        self.backend = self.back.getsockopt_string(zmq.LAST_ENDPOINT)
        self.journal = journal
        self.table = J.Table(journal, self.admission.max_attempts)
        self.acks: set[asyncio.Task] = set()
        self.owing: set[asyncio.Task] = set()  # results waiting for their end to be durable
        self.controllers: dict[bytes, Controller] = {}
        self.admitting = True
        self.registered = asyncio.Event()  # a controller said `ready`
        self.idle = asyncio.Event()  # nothing queued or running
        recovered = self.table.recover()
        if recovered:
            log.info("journal %s: %d unfinished jobs queued again", journal.path, recovered)
        else:
            self.idle.set()

    # --- lifecycle ---

    async def run(self) -> None:
        await asyncio.gather(self._front_loop(), self._back_loop(), self._tick_loop())

    async def drain(self, timeout_s: float) -> bool:
        """Stop admitting, wait (bounded) for every held job to finish, tell controllers to stop."""
        self.admitting = False
        try:
            await asyncio.wait_for(self.idle.wait(), timeout_s)
            drained = True
        except TimeoutError:
            drained = False
        for ident in list(self.controllers):
            send(self.back, [ident, *encode(Kind.STOP)])
        return drained

    def close(self) -> None:
        self.front.close(0)
        self.back.close(0)

    # --- clients ---

    async def _front_loop(self) -> None:
        while True:
            for frames in await recv_batch(self.front):
                ident, rest = frames[0], frames[1:]
                msg = None
                try:
                    msg = decode(rest, self.limits, CLIENT_KINDS)
                    self._on_client(ident, msg)
                except ProtocolError as e:
                    # the reply names the request it refuses, whether decode or a handler refused
                    ref = e.ref if msg is None else msg.body.get("ref")
                    send(self.front, [ident, *error(e.code, e.message, ref=ref)])
                except Exception as e:  # a bug must not take the door down for everyone
                    log.exception("client message failed")
                    send(self.front, [ident, *error(Code.INTERNAL, f"{type(e).__name__}: {e}")])

    def _on_client(self, ident: bytes, msg: Message) -> None:
        ref = msg.body.get("ref")
        if msg.kind == Kind.SUBMIT:
            self._submit(ident, msg.body, ref)
        elif msg.kind == Kind.STATUS:
            send(self.front, [ident, *encode(Kind.STATUS, {**self.status(), "ref": ref})])
        elif msg.kind == Kind.CANCEL:
            self._cancel(ident, msg.body, ref)
        elif msg.kind == Kind.PING:
            send(self.front, [ident, *encode(Kind.PONG, {"ref": ref})])

    def _submit(self, ident: bytes, body: dict[str, Any], ref: Any) -> None:
        raw = get(body, "jobs", list)
        if not self.journal.ok:  # nothing can be made durable now: refuse, do not promise
            self._refuse_unjournaled(ident, raw, ref)
            return
        if len(raw) > self.admission.max_jobs_per_message:
            raise ProtocolError(
                Code.BAD_FIELD,
                f"{len(raw)} jobs in one submit; at most {self.admission.max_jobs_per_message}",
            )
        ids: list[str] = []
        refused: list[dict[str, Any]] = []
        stored: list[J.Job] = []
        fresh: list[J.Job] = []
        seen: set[str] = set()
        served = {c.model: J.Served(c.tasks) for c in self.controllers.values()}
        self.table.recall(
            [i["id"] for i in raw if isinstance(i, dict) and isinstance(i.get("id"), str)]
        )
        default = next(iter(served), "")
        for item in raw:
            try:
                job = J.validate(item, served, default, self.admission.max_text_chars)
                if job.id in seen:
                    raise ProtocolError(
                        Code.DUPLICATE_ID, f"id {job.id!r} appears twice in this submit"
                    )
                if not self.admitting:
                    raise ProtocolError(
                        Code.SHUTTING_DOWN, "the broker is draining and admits no new jobs"
                    )
            except ProtocolError as e:
                jid = (
                    item.get("id")
                    if isinstance(item, dict) and isinstance(item.get("id"), str)
                    else None
                )
                refused.append(J.failure(jid, e.code, e.message))
                continue
            seen.add(job.id)
            known = self.table.jobs.get(job.id)
            if known is not None:  # the id is an idempotency key: attach, or hand back the result
                if known.state in J.FINAL:
                    stored.append(known)
                elif ident not in known.waiters:
                    known.waiters.append(ident)
                ids.append(job.id)
                continue
            if self.table.queued + len(fresh) >= self.admission.max_queued:
                entry = J.failure(job.id, Code.BUSY, "the queue is full; retry later")
                entry["error"]["retry_after_ms"] = BUSY_RETRY_MS
                refused.append(entry)
                continue
            job.waiters.append(ident)
            fresh.append(job)
            ids.append(job.id)
        if fresh:
            self.table.add(fresh)
            self.idle.clear()
            self._dispatch()
        # "accepted" only once the journal holds the jobs; meanwhile the door stays open
        task = asyncio.create_task(self._ack(ident, ids, ref, refused, stored))
        self.acks.add(task)
        task.add_done_callback(self.acks.discard)

    def _refuse_unjournaled(self, ident: bytes, raw: list[Any], ref: Any) -> None:
        why = f"the journal cannot be written ({self.journal.error}); retry later"
        refused = []
        for item in raw:
            jid = item.get("id") if isinstance(item, dict) else None
            entry = J.failure(jid if isinstance(jid, str) else None, Code.JOURNAL_UNAVAILABLE, why)
            entry["error"]["retry_after_ms"] = JOURNAL_RETRY_MS
            refused.append(entry)
        send(self.front, [ident, *encode(Kind.ACCEPTED, {"ids": [], "ref": ref})])
        if refused:
            send(self.front, [ident, *encode(Kind.RESULTS, {"results": refused})])

    async def _ack(
        self,
        ident: bytes,
        ids: list[str],
        ref: Any,
        refused: list[dict[str, Any]],
        stored: list[J.Job],
    ) -> None:
        try:
            await self.journal.commit()
        except Exception as e:  # the disk failed us: say so rather than promise
            log.exception("journal commit failed")
            send(self.front, [ident, *error(Code.INTERNAL, f"journal write failed: {e}", ref=ref)])
            return
        send(self.front, [ident, *encode(Kind.ACCEPTED, {"ids": ids, "ref": ref})])
        if refused:
            send(self.front, [ident, *encode(Kind.RESULTS, {"results": refused})])
        if stored:
            self._deliver({ident: stored})

    def _cancel(self, ident: bytes, body: dict[str, Any], ref: Any) -> None:
        ids = get(body, "ids", list)
        if not all(isinstance(i, str) for i in ids):
            raise ProtocolError(Code.BAD_FIELD, "field 'ids' must be a list of strings")
        done, unknown, ended = [], [], []
        running: dict[bytes, list[str]] = defaultdict(list)
        for jid in ids:
            held = self.table.get(jid)
            where = held.controller if held is not None and held.state is J.State.RUNNING else None
            job = self.table.cancel(jid)
            if job is None:
                unknown.append(jid)
                continue
            done.append(jid)
            if where is not None:
                running[where].append(jid)
            ended.append(job)
        for where, jids in running.items():  # so the controller frees their places in its batches
            send(self.back, [where, *encode(Kind.CANCEL, {"ids": jids})])
        send(
            self.front,
            [ident, *encode(Kind.CANCELLED, {"ids": done, "unknown": unknown, "ref": ref})],
        )
        self._owe(ended)

    def _deliver(self, owed: dict[bytes, list[J.Job]]) -> None:
        """One `results` message per client: entries, plus one tensor of the ok embeddings."""
        for ident, done in owed.items():
            entries, rows = [], []
            for j in done:
                if j.embedding is None:
                    entries.append(j.entry)
                else:
                    entries.append({**j.entry, "row": len(rows)})
                    rows.append(j.embedding)
            tensors = [torch.stack(rows)] if rows else []
            # an undeliverable result stays in the table: the client can submit the id again
            send(self.front, [ident, *encode(Kind.RESULTS, {"results": entries}, tensors)])

    def status(self) -> dict[str, Any]:
        ctrls = list(self.controllers.values())
        first = ctrls[0] if ctrls else None
        return {
            "model": first.model if first else None,
            "models": sorted({c.model for c in ctrls}),
            "layout": first.layout if first else {},
            "workers": [w for c in ctrls for w in c.workers],
            "controllers": [
                {
                    "model": c.model,
                    "pid": c.pid,
                    "state": c.state,
                    "credit": c.credit,
                    "stats": c.stats,
                }
                for c in ctrls
            ],
            "jobs": self.table.summary(),
            "admitting": self.admitting,
            "journal": self.journal.health(),
            "pid": os.getpid(),
        }

    # --- controllers ---

    async def _back_loop(self) -> None:
        while True:
            for frames in await recv_batch(self.back):
                ident, rest = frames[0], frames[1:]
                try:
                    msg = decode(rest, self.limits, CONTROLLER_KINDS)
                    self._on_controller(ident, msg)
                except ProtocolError as e:
                    log.warning("bad message from controller %r: %s %s", ident, e.code, e.message)
                except Exception:
                    log.exception("controller message failed")

    def _on_controller(self, ident: bytes, msg: Message) -> None:
        ctrl = self.controllers.get(ident)
        if ctrl is not None:
            ctrl.seen = time.monotonic()  # any traffic is a heartbeat
        if msg.kind == Kind.READY:
            b = msg.body
            self.controllers[ident] = Controller(
                ident,
                get(b, "model", str),
                frozenset(get(b, "tasks", list)),
                get(b, "layout", dict),
                get(b, "workers", list, []),
                get(b, "pid", int, None),
            )
            log.info("controller %r ready for model %s", ident, b["model"])
            self.registered.set()
        elif ctrl is None:
            # a controller we do not know (e.g. we restarted): it must say `ready` again
            send(self.back, [ident, *error(Code.BAD_FIELD, "say `ready` first")])
        elif msg.kind == Kind.CREDIT:
            ctrl.credit += get(msg.body, "n", int)
            self._dispatch()
        elif msg.kind == Kind.RESULTS:
            ctrl.stats = get(msg.body, "stats", dict, ctrl.stats)
            self._results(msg, ident)
        elif msg.kind == Kind.REPORT:
            ctrl.workers = get(msg.body, "workers", list, ctrl.workers)
            ctrl.state = get(msg.body, "state", str, ctrl.state)
            ctrl.stats = get(msg.body, "stats", dict, ctrl.stats)

    def _results(self, msg: Message, ident: bytes) -> None:
        entries = get(msg.body, "results", list)
        emb = msg.tensors[0] if msg.tensors else None
        ended = []
        for entry in entries:
            vec = None
            row = entry.pop("row", None)
            if row is not None:
                if emb is None or not isinstance(row, int) or not 0 <= row < len(emb):
                    raise ProtocolError(Code.BAD_TENSOR, f"results: no embedding row {row!r}")
                vec = emb[row].clone()
            job = self.table.finish(entry.get("id"), entry, vec, ident)
            if job is not None:  # None: late or duplicate, dropped
                ended.append(job)
        self._owe(ended)

    def _dispatch(self) -> None:
        for ctrl in self.controllers.values():
            if ctrl.credit <= 0 or not self.table.pending(ctrl.model):
                continue
            batch = self.table.take(ctrl.model, ctrl.credit, ctrl.ident)
            if not batch:
                continue
            if send(
                self.back, [ctrl.ident, *encode(Kind.JOBS, {"jobs": [j.wire() for j in batch]})]
            ):
                ctrl.credit -= len(batch)
            else:
                self.lost(ctrl.ident, "unreachable")

    def _owe(self, ended: list[J.Job]) -> None:
        """Results go out only once their ends are committed (a delivered job must never run
        again); those of one call share one group commit and one message per client."""
        if ended:
            task = asyncio.create_task(self._owe_durable(ended))
            self.owing.add(task)
        elif not self.owing:
            self._check_idle()  # else the last delivery checks

    async def _owe_durable(self, ended: list[J.Job]) -> None:
        try:
            await self.journal.commit()  # waits out a failing disk: results are held meanwhile
            owed: dict[bytes, list[J.Job]] = defaultdict(list)
            for job in ended:
                for w in job.waiters:
                    owed[w].append(job)
            self._deliver(owed)
        except Exception:  # closed while failing: not delivered, so they run again next start
            log.exception("results not delivered")
        finally:
            self.owing.discard(asyncio.current_task())
            if not self.owing:
                self._check_idle()  # idle only once everything owed went out

    def _check_idle(self) -> None:
        if self.table.queued == 0 and self.table.running == 0:
            self.idle.set()

    def lost(self, ident: bytes, why: str) -> None:
        """A controller's lease on its jobs ends: they go back to the queue (or fail, if that
        was their last attempt)."""
        ctrl = self.controllers.pop(ident, None)
        n, failed = self.table.requeue(ident, f"controller lost: {why}")
        log.warning(
            "controller %r lost (%s); %d jobs back in the queue, %d failed",
            ident,
            why,
            n,
            len(failed),
        )
        self._owe(failed)
        if ctrl is not None and not any(c.model == ctrl.model for c in self.controllers.values()):
            self.registered.clear()
        self._dispatch()

    async def _tick_loop(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(self.heartbeat_s)  # the heartbeat period itself
            ticks += 1
            self._owe(self.table.expire(time.time()))
            if ticks % 60 == 0:
                self.journal.expire()
            now = time.monotonic()
            for ident, ctrl in list(self.controllers.items()):
                if now - ctrl.seen > self.dead_after_s:
                    self.lost(ident, f"silent for {now - ctrl.seen:.1f} s")
                else:
                    send(self.back, [ident, *encode(Kind.HEARTBEAT)])
