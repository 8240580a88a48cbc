"""The broker: the front door for clients and the dispatcher to controllers (Majordomo style).

Two ROUTER sockets. Clients (DEALER) submit, query status and cancel on the front; controllers
(DEALER) register on the back with `ready`, ask for work with `credit`, and return `results`.
Every job is validated at the door, refused with a typed error or accepted into its model's
queue, and its result is routed back to every client waiting on that id.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq
import zmq.asyncio

from broker import jobs as J
from broker import validation as V
from broker.admission import Admission
from broker.journal import Journal
from broker.outbox import Outbox
from wire.protocol import (
    ENVELOPE,
    Code,
    Kind,
    Limits,
    Message,
    ProtocolError,
    encode,
    error,
    fitted,
    get,
)
from wire.transport import (
    Handler,
    Heartbeat,
    Peer,
    Pulse,
    authenticator,
    configure,
    curve_server,
    send,
    serve,
)

log = logging.getLogger("baton.broker")

# Messages ZeroMQ holds per client each way. Out: what a slow reader leaves waits in the outbox.
# In: past it ZeroMQ stops reading that client's connection, so a client that floods us waits
# in its own send queue (TCP backpressure) instead of in our memory.
FRONT_HWM = 64
FRONT_RCVHWM = 16
RESULTS_TO_CLIENT_BYTES = 1 << 20  # one `results` message to a client, at most
MAX_URGENT = 8  # a controller's urgent lane (priority-0 jobs past its credit) at most
SENT_KEPT = 64  # recent `jobs` messages per controller, by ref, for a refusal that names one
SIZE_REFUSALS = frozenset({Code.TOO_LARGE, Code.TOO_MANY_FRAMES, Code.TOO_MANY_ITEMS})


@dataclass(frozen=True, slots=True)
class Keys:
    """CURVE on the client endpoint: the server's secret certificate and the allow-list
    directory of client public certificates (both made by `baton keys`), and public keys let
    in besides them (the HTTP gateway's, made by `baton up` for its run)."""

    server_cert: str
    client_dir: str
    also: tuple[bytes, ...] = ()


@dataclass(slots=True)
class Controller:
    ident: bytes
    model: str
    tasks: frozenset[str]
    layout: dict[str, int]
    generation: V.Generation | None = None  # a decoder's bounds, from its `ready`
    embedding: V.Embedding | None = None  # an encoder's bounds, likewise
    workers: list[dict[str, Any]] = field(default_factory=list)
    pid: int | None = None
    replica: int = 0  # which of the fleet's data-parallel copies (parallel.replicas)
    state: str = "ready"
    stats: dict[str, int] = field(default_factory=dict)
    pool_bytes: int = 0  # its workers' shared weight pool (workers/pool.py), from its report
    epoch: int = 0  # which registration of this controller process this is
    credit: int = 0  # jobs it asked for and has not been sent yet
    credit_bytes: int = 0  # bytes (protocol.job_size) likewise
    # priority-0 jobs it may be sent beyond its credit: an interactive job must not wait at the
    # broker while the controller's queue is full of batch work (it would go ahead of it there)
    urgent: int = 0
    pulse: Pulse = field(default_factory=lambda: Heartbeat().pulse(time.monotonic()))
    sent: OrderedDict[int, list[str]] = field(default_factory=OrderedDict)


class Broker:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        client_endpoint: str,
        journal: Journal,
        limits: Limits | None = None,
        *,
        max_attempts: int = 3,
        heartbeat: Heartbeat | None = None,
        backend_endpoint: str = "tcp://127.0.0.1:*",
        keys: Keys | None = None,
    ) -> None:
        self.limits = limits = limits or Limits()
        self.front_limits = limits.front()
        self.heartbeat = heartbeat or Heartbeat()
        self.refs = itertools.count(1)
        self.front = ctx.socket(zmq.ROUTER)
        configure(self.front, limits, mandatory=True)
        self.front.setsockopt(zmq.SNDHWM, FRONT_HWM)
        self.front.setsockopt(zmq.RCVHWM, FRONT_RCVHWM)
        self.outbox = Outbox(self.front, limits.max_unread_bytes)
        # with keys, only CURVE clients on the allow-list get in, and each job belongs to its key
        self.auth = None
        if keys is not None:
            curve_server(self.front, keys.server_cert)
            self.auth = authenticator(ctx, keys.client_dir, keys.also)
        self.front.bind(client_endpoint)
        self.endpoint = self.front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.back = ctx.socket(zmq.ROUTER)
        configure(self.back, limits, mandatory=True)
        self.back.bind(backend_endpoint)  # `baton up`: ipc:// in its private run directory
        self.backend = self.back.getsockopt_string(zmq.LAST_ENDPOINT)
        self.journal = journal
        self.table = J.Table(journal, max_attempts)
        self.acks: set[asyncio.Task] = set()
        self.owing: set[asyncio.Task] = set()  # results waiting for their end to be durable
        self.controllers: dict[bytes, Controller] = {}
        self.admission = Admission(self.table, limits)
        self.registered = asyncio.Event()  # a controller said `ready`
        self.arrivals: dict[bytes, asyncio.Event] = {}  # per controller, for `baton up`
        self.turns = 0  # messages of jobs sent: which controller goes first among equals
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
        self.admission.admitting = False
        try:
            async with asyncio.timeout(timeout_s):
                await self.idle.wait()
            drained = True
        except TimeoutError:
            drained = False
        for ident in list(self.controllers):
            send(self.back, [ident, *encode(Kind.STOP)])
        return drained

    def close(self) -> None:
        self.front.close(0)
        self.back.close(0)
        if self.auth is not None:
            self.auth.stop()

    # --- clients ---

    async def _front_loop(self) -> None:
        await serve(
            self.front,
            self.front_limits,
            {
                Kind.SUBMIT: self._submit,
                Kind.STATUS: self._status,
                Kind.CANCEL: self._cancel,
                Kind.PING: self._ping,
            },
            routed=True,
            keyed=self.auth is not None,
            answer=lambda peer, frames: self.outbox.send(peer.ident, frames),
            before=self._flush_if_waiting,
            log=log,
        )

    def _flush_if_waiting(self) -> None:
        if self.outbox.waiting:  # a client that sends is likely reading again
            self.outbox.flush()

    def _status(self, peer: Peer, msg: Message) -> None:
        self.outbox.send(
            peer.ident, encode(Kind.STATUS, {**self.status(), "ref": msg.body.get("ref")})
        )

    def _ping(self, peer: Peer, msg: Message) -> None:
        self.outbox.send(peer.ident, encode(Kind.PONG, {"ref": msg.body.get("ref")}))

    def _submit(self, peer: Peer, msg: Message) -> None:
        ident, owner, ref = peer.ident, peer.user, msg.body.get("ref")
        served = {
            c.model: V.Served(c.tasks, c.generation, c.embedding) for c in self.controllers.values()
        }
        admitted = self.admission.submit(msg.body, served, ident, owner)
        if admitted.fresh:
            self.table.add(admitted.fresh)
            self.idle.clear()
            self._dispatch()
        # "accepted" only once the journal holds the jobs; meanwhile the door stays open
        task = asyncio.create_task(
            self._ack(ident, admitted.ids, ref, admitted.refused, admitted.stored)
        )
        self.acks.add(task)
        task.add_done_callback(self.acks.discard)

    async def _ack(
        self,
        ident: bytes,
        ids: list[str],
        ref: Any,
        refused: list[dict[str, Any]],
        stored: list[J.Job],
    ) -> None:
        try:
            if ids:  # a submit refused whole promises nothing, so it need not wait for the disk
                await self.journal.commit()
        except Exception as e:  # the disk failed us: say so rather than promise
            log.exception("journal commit failed")
            self.outbox.send(ident, error(Code.INTERNAL, f"journal write failed: {e}", ref=ref))
            return
        self.outbox.send(ident, encode(Kind.ACCEPTED, {"ids": ids, "ref": ref}))
        if refused:
            self.outbox.send(ident, encode(Kind.RESULTS, {"results": refused}))
        if stored:
            self._deliver({ident: stored})

    def _cancel(self, peer: Peer, msg: Message) -> None:
        ident, owner, ref = peer.ident, peer.user, msg.body.get("ref")
        ids = get(msg.body, "ids", list)
        if len(ids) > self.limits.max_ids_per_message:
            raise ProtocolError(
                Code.TOO_MANY_ITEMS,
                f"{len(ids)} ids in one cancel; at most {self.limits.max_ids_per_message}",
            )
        if not all(isinstance(i, str) for i in ids):
            raise ProtocolError(Code.BAD_FIELD, "field 'ids' must be a list of strings")
        done, unknown, ended = [], [], []
        running: dict[bytes, list[str]] = defaultdict(list)
        for jid in ids:
            held = self.table.get(jid)
            if held is not None and held.owner != owner:
                unknown.append(jid)  # another key's job does not exist, as far as this one knows
                continue
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
        self.outbox.send(
            ident, encode(Kind.CANCELLED, {"ids": done, "unknown": unknown, "ref": ref})
        )
        self._owe(ended)

    def _deliver(self, owed: dict[bytes, list[J.Job]]) -> None:
        """`results` messages per client, each within the message limit: entries, plus a
        tensor of the ok embeddings for each dtype among them (float32, float16), which the
        entries name by `row` and, past the first tensor, `tensor`."""
        if self.outbox.waiting:
            self.outbox.flush()
        budget = min(self.limits.max_message_bytes, RESULTS_TO_CLIENT_BYTES)

        def build(a: int, b: int) -> list:
            entries: list[dict[str, Any]] = []
            rows: dict[torch.dtype, list[torch.Tensor]] = {}  # in the order the dtypes come
            for j in done[a:b]:
                if j.embedding is None:
                    entries.append(j.entry)
                    continue
                same = rows.setdefault(j.embedding.dtype, [])
                entry = {**j.entry, "row": len(same)}
                if (t := list(rows).index(j.embedding.dtype)) > 0:
                    entry["tensor"] = t
                entries.append(entry)
                same.append(j.embedding)
            return encode(
                Kind.RESULTS, {"results": entries}, [torch.stack(r) for r in rows.values()]
            )

        for ident, done in owed.items():
            for frames in fitted(build, len(done), budget):
                # a result no client took stays in the table: it can submit the id again
                self.outbox.send(ident, frames)

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
                    "replica": c.replica,
                    "state": c.state,
                    "credit": c.credit,
                    "credit_bytes": c.credit_bytes,
                    "epoch": c.epoch,
                    "stats": c.stats,
                }
                for c in ctrls
            ],
            # one region per host, however many workers and replicas map it
            "pool_bytes": max((c.pool_bytes for c in ctrls), default=0),
            "jobs": self.table.summary(),
            "queue_time": self.table.queue_time.state(),
            "unread_bytes": self.outbox.bytes(),
            "admitting": self.admission.admitting,
            "journal": self.journal.health(),
            "pid": os.getpid(),
        }

    # --- controllers ---

    async def _back_loop(self) -> None:
        await serve(
            self.back,
            self.limits,
            {
                Kind.READY: self._register,
                Kind.CREDIT: self._known(self._credit),
                Kind.RESULTS: self._known(self._results),
                Kind.TOKENS: self._known(self._tokens),
                Kind.REPORT: self._known(self._report),
                Kind.ERROR: self._known(self._refused),
                Kind.HEARTBEAT: self._known(lambda ctrl, msg: None),  # its arrival was the point
            },
            routed=True,
            refused=self._unreadable,
            log=log,
        )

    def _known(self, handler: Callable[[Controller, Message], None]) -> Handler:
        """A handler for a registered controller's message; any other is told to register."""

        def known(peer: Peer, msg: Message) -> None:
            ctrl = self.controllers.get(peer.ident)
            if ctrl is None:
                # one we dropped (silent too long, or we were) or never knew: it registers again
                epoch = msg.body.get("epoch")
                refusal = error(
                    Code.UNKNOWN_PEER,
                    "unknown controller: say `ready` again",
                    epoch=epoch if isinstance(epoch, int) else None,
                )
                send(self.back, [peer.ident, *refusal])
                return
            ctrl.pulse.hear(time.monotonic())  # any traffic is a heartbeat
            handler(ctrl, msg)

        return known

    def _unreadable(self, peer: Peer, e: ProtocolError) -> None:
        log.warning("bad message from controller %r: %s %s", peer.ident, e.code, e.message)
        if e.code in SIZE_REFUSALS and peer.ident in self.controllers:
            # results we cannot read: its jobs go back to the queue rather than stay leased to
            # it, and it must register again
            self.lost(peer.ident, f"sent a message refused as {e.code}: {e.message}")

    def _credit(self, ctrl: Controller, msg: Message) -> None:
        n, nbytes = get(msg.body, "n", int), get(msg.body, "bytes", int)
        urgent = get(msg.body, "urgent", int, ctrl.urgent)
        if not 0 <= urgent <= MAX_URGENT:
            raise ProtocolError(Code.BAD_FIELD, f"urgent must be in [0, {MAX_URGENT}]")
        ctrl.credit += n
        ctrl.credit_bytes += nbytes
        ctrl.urgent = urgent
        self._dispatch()

    def _report(self, ctrl: Controller, msg: Message) -> None:
        ctrl.workers = get(msg.body, "workers", list, ctrl.workers)
        ctrl.state = get(msg.body, "state", str, ctrl.state)
        ctrl.stats = get(msg.body, "stats", dict, ctrl.stats)
        ctrl.pool_bytes = get(msg.body, "pool_bytes", int, ctrl.pool_bytes)

    def _register(self, peer: Peer, msg: Message) -> None:
        ident, b = peer.ident, msg.body
        old = self.controllers.get(ident)
        self.controllers[ident] = Controller(
            ident,
            get(b, "model", str),
            frozenset(get(b, "tasks", list)),
            get(b, "layout", dict),
            _generation(get(b, "generation", dict, None)),
            _embedding(get(b, "embedding", dict, None)),
            get(b, "workers", list, []),
            get(b, "pid", int, None),
            replica=get(b, "replica", int, 0),
            pool_bytes=get(b, "pool_bytes", int, 0),
            epoch=get(b, "epoch", int, 0),
            pulse=self.heartbeat.pulse(time.monotonic()),
        )
        if old is not None:
            # it registers again without having been dropped: what it held is gone from it
            n, failed = self.table.requeue(ident, "controller registered again")
            self._owe(failed)
        log.info("controller %r ready for model %s", ident, b["model"])
        self.registered.set()
        self.arrival(ident).set()

    def arrival(self, ident: bytes) -> asyncio.Event:
        """Set once the controller `ident` has said `ready` (`baton up` waits for each replica's)."""
        return self.arrivals.setdefault(ident, asyncio.Event())

    def _refused(self, ctrl: Controller, msg: Message) -> None:
        """The controller could not read one of our `jobs` messages: its jobs go back."""
        body = msg.body
        code, ref = body.get("code"), body.get("ref")
        log.warning("controller %r refused message %r: %s %s", ctrl.ident, ref, code, body)
        ids = ctrl.sent.pop(ref, None) if isinstance(ref, int) else None
        if ids:
            n, failed = self.table.requeue(ctrl.ident, f"controller refused it: {code}", ids)
            self._owe(failed)
            self._dispatch()

    def _results(self, ctrl: Controller, msg: Message) -> None:
        ctrl.stats = get(msg.body, "stats", dict, ctrl.stats)
        ident = ctrl.ident
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

    def _tokens(self, ctrl: Controller, msg: Message) -> None:
        """Generated tokens as they come: each delta goes to every client waiting on its job,
        only while that job runs on this controller's lease (a lost lease's late deltas are
        dropped). Never journaled: the final result is what counts."""
        owed: dict[bytes, list[dict[str, Any]]] = defaultdict(list)
        for delta in get(msg.body, "deltas", list):
            if not _is_delta(delta):
                raise ProtocolError(Code.BAD_FIELD, "tokens: a delta is {id, index, token_ids}")
            job = self.table.jobs.get(delta["id"])
            if job is None or job.state is not J.State.RUNNING or job.controller != ctrl.ident:
                continue
            for ident in job.waiters:
                owed[ident].append(delta)
        if not owed:
            return
        if self.outbox.waiting:
            self.outbox.flush()
        budget = min(self.limits.max_message_bytes, RESULTS_TO_CLIENT_BYTES)
        for ident, deltas in owed.items():
            # fitted: the deltas of many jobs for one client may not fit one message
            for frames in fitted(
                lambda a, b, d=deltas: encode(Kind.TOKENS, {"deltas": d[a:b]}), len(deltas), budget
            ):
                self.outbox.send(ident, frames)

    def _dispatch(self) -> None:
        """Hand queued jobs to controllers within their credit, in messages within the limit."""
        budget = self.limits.max_message_bytes - ENVELOPE
        # the controller with the most room first, taking turns among equals: replicas share
        # a light load too
        ctrls = list(self.controllers.values())
        turn = self.turns % len(ctrls) if ctrls else 0
        for ctrl in sorted(ctrls[turn:] + ctrls[:turn], key=lambda c: -c.credit):
            while ctrl.credit > 0 and ctrl.credit_bytes > 0 and self.table.pending(ctrl.model):
                nbytes = min(ctrl.credit_bytes, budget)
                batch = self.table.take(ctrl.model, ctrl.credit, ctrl.ident, nbytes)
                if not batch or not self._send(ctrl, batch):
                    break
                self.turns += 1
                ctrl.credit -= len(batch)
                ctrl.credit_bytes -= sum(j.size for j in batch)
        for ctrl in ctrls:  # the urgent lane: priority-0 jobs past the credit, one a message
            while ctrl.urgent > 0 and self.table.pending(ctrl.model, 0):
                batch = self.table.take(ctrl.model, 1, ctrl.ident, None, priority=0)
                if not batch or not self._send(ctrl, batch, urgent=True):
                    break
                ctrl.urgent -= 1

    def _send(self, ctrl: Controller, batch: list[J.Job], **extra: Any) -> bool:
        """A `jobs` message to the controller, kept by ref for a refusal that names it; False
        (and the controller lost) when it cannot be reached."""
        ref = next(self.refs)
        body = {"jobs": [j.wire() for j in batch], "ref": ref, **extra}
        if not send(self.back, [ctrl.ident, *encode(Kind.JOBS, body)]):
            self.lost(ctrl.ident, "unreachable")
            return False
        ctrl.sent[ref] = [j.id for j in batch]
        while len(ctrl.sent) > SENT_KEPT:
            ctrl.sent.popitem(last=False)
        return True

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
        self.arrivals.pop(ident, None)
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
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.heartbeat.period_s)  # the heartbeat period itself
            ticks += 1
            self.outbox.flush()
            self._owe(self.table.expire(time.time()))
            if ticks % 60 == 0:
                self.journal.expire()
            now = time.monotonic()
            if self.heartbeat.stalled(now - last):
                # the controllers' silence is ours: judge them from now on
                log.warning("the broker was stalled for %.1f s", now - last)
                for ctrl in self.controllers.values():
                    ctrl.pulse.hear(now)
            last = now
            for ident, ctrl in list(self.controllers.items()):
                if ctrl.pulse.silent(now):
                    self.lost(ident, f"silent for {ctrl.pulse.quiet_s(now):.1f} s")
                elif ctrl.pulse.due(now) and send(self.back, [ident, *encode(Kind.HEARTBEAT)]):
                    ctrl.pulse.beat(now)


def _generation(info: dict[str, Any] | None) -> V.Generation | None:
    """A decoder controller's `ready` "generation" (absent for encoders)."""
    if info is None:
        return None
    eos = get(info, "eos_token_id", int, None)
    return V.Generation(get(info, "vocab_size", int), get(info, "max_positions", int), eos)


def _embedding(info: dict[str, Any] | None) -> V.Embedding | None:
    """An encoder controller's `ready` "embedding" (absent for decoders)."""
    return None if info is None else V.Embedding(get(info, "vocab_size", int))


def _is_delta(d: Any) -> bool:
    return (
        isinstance(d, dict)
        and isinstance(d.get("id"), str)
        and type(d.get("index")) is int
        and isinstance(d.get("token_ids"), list)
        and all(type(t) is int for t in d["token_ids"])
    )
