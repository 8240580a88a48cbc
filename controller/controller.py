"""The controller of one model replica: asyncio on uvloop, one process.

It registers with the broker, asks for work by credits, tokenizes, forms padding-free batches,
keeps several in flight through the pipeline, returns results, and supervises its workers. When a
worker dies, the whole replica is restarted (its TP groups cannot be mended piecemeal) and the
batches that were inside go back to the front of the queue.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import uvloop
import zmq
import zmq.asyncio

from broker.jobs import failure
from controller.config import Config, from_dict
from controller.pipeline import Pipeline
from controller.scheduler import Item, Scheduler
from controller.supervisor import Supervisor
from wire.protocol import (
    Code,
    Kind,
    Limits,
    ProtocolError,
    decode,
    encode,
    fitted,
    job_size,
)
from wire.transport import configure, recv_batch
from workers.models import load_info
from workers.tokenizer import Tokenizer

log = logging.getLogger("baton.controller")

TASKS = ("embed", "echo")  # echo: routed through every stage, no model; measures the path


class Controller:
    def __init__(self, cfg: Config, broker: str, run_dir: Path) -> None:
        # sockets of our own: orphans of a dead predecessor must not reach our workers
        run_dir = run_dir / f"c{os.getpid()}"
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # ipc sockets: ours alone
        self.cfg, self.run_dir = cfg, run_dir
        self.limits = Limits(cfg.limits.max_message_bytes, cfg.limits.max_frames)
        info = load_info(cfg.model.path)
        if cfg.model.max_seq_length:
            info.max_seq_length = cfg.model.max_seq_length
        self.model = cfg.model.name or info.name
        self.tokenizer = Tokenizer(info)
        self.ctx = zmq.asyncio.Context()
        self.link = self.ctx.socket(zmq.DEALER)
        # a fixed identity lets `baton up` tell the broker which controller's jobs to requeue
        self.link.setsockopt(zmq.IDENTITY, identity(os.getpid()))
        configure(self.link, self.limits)
        self.link.connect(broker)
        results = f"ipc://{run_dir}/results"
        self.sup = Supervisor(cfg, self.ctx, run_dir, results)
        self.sup.on_change = self.report
        self.sup.on_dead = self._on_dead
        self.sup.on_failed = self._on_refused
        self.serving = asyncio.Event()  # clear while the replica restarts
        self.restarting: asyncio.Task | None = None
        self.pipe = Pipeline(
            self.ctx,
            self.sup.first_stage(),
            results,
            self.limits,
            cfg.pipeline.max_inflight,
            padded=not cfg.batching.padding_free,
        )
        self.pipe.on_refused = self._on_refused
        self.sched = Scheduler(cfg.batching.max_batch_tokens, cfg.batching.max_wait_ms)
        # jobs held here (queued or in flight) at most; enough to keep every in-flight slot full
        self.capacity = cfg.pipeline.max_inflight * max(64, cfg.batching.max_batch_tokens // 8)
        # Credit: ask the broker for more only while fewer than two batches' worth of tokens wait
        # here, so the rest of the backlog waits at the broker, where clients are served in turn
        # and messages are cut to the size limit. Credit is counted in jobs and in bytes; the
        # `asked_*` fields mirror what the broker still owes us under it.
        self.target = 2 * cfg.batching.max_batch_tokens
        self.held = 0  # jobs here, queued or in flight
        self.asked_jobs = self.asked_bytes = 0
        self.avg_cost, self.avg_bytes = 64.0, 512.0  # per job, from the jobs seen so far
        self.epoch = 0  # our registrations with the broker so far
        self.stopping = asyncio.Event()
        self.failed = False  # stopping because the replica could not be restarted
        self.state = "starting"
        log_path = cfg.jobs.execution_log
        self.executions = open(log_path, "a") if log_path else None  # noqa: SIM115 (lives as long as we do)

    def tell(self, kind: Kind, body: dict[str, Any] | None = None, tensors: list = ()) -> None:
        self.link.send_multipart(self.frames(kind, body, tensors), copy=False)

    def frames(self, kind: Kind, body: dict[str, Any] | None = None, tensors: list = ()) -> list:
        # the epoch lets us tell the broker's answer to this registration from stale ones
        return encode(kind, {**(body or {}), "epoch": self.epoch}, tensors)

    def report(self) -> None:
        if self.state == "starting":
            return  # the broker hears of the workers in our `ready`
        self.tell(
            Kind.REPORT,
            {"workers": self.sup.rows(), "state": self.state, "stats": self.pipe.stats()},
        )

    async def run(self) -> None:
        self.sup.spawn()
        supervise = asyncio.create_task(self.sup.run())
        await self.sup.wait_ready()
        self.state = "ready"
        self.serving.set()
        self._register()
        loops = [
            asyncio.create_task(c)
            for c in (self._listen(), self._dispatch(), self._collect(), self._beat())
        ]
        await self.stopping.wait()
        # drain: the broker sends `stop` only once nothing is held, so whatever is left is lost work
        if self.restarting is not None:
            loops.append(self.restarting)
        for task in (*loops, supervise):
            task.cancel()
        await asyncio.gather(*loops, supervise, return_exceptions=True)
        self.state = "stopping"
        await self.sup.stop()
        self.pipe.close()
        self.link.close(0)
        self.ctx.term()
        if self.executions is not None:
            self.executions.close()

    def _register(self) -> None:
        """Say `ready` (again): a fresh registration starts with no credit at the broker."""
        self.epoch += 1
        self.asked_jobs = self.asked_bytes = 0
        layout = {"tensor": self.cfg.parallel.tensor, "pipeline": self.cfg.parallel.pipeline}
        self.tell(
            Kind.READY,
            {
                "model": self.model,
                "tasks": list(TASKS),
                "layout": layout,
                "workers": self.sup.rows(),
                "pid": os.getpid(),
                "state": self.state,
            },
        )
        self._top_up()

    def _rejoin(self) -> None:
        """The broker dropped us (we were stalled past its timeout, or it was): it has put our
        jobs back in its queue, so the ones still waiting here go; those already inside the
        pipeline finish, and their results are taken once or dropped as late."""
        gone = self.sched.clear()
        self.held -= len(gone)
        log.warning(
            "the broker no longer knew us; registering again (%d queued jobs dropped)", len(gone)
        )
        self._register()

    def _top_up(self) -> None:
        """Ask for more work when little waits here and no request stands at the broker."""
        if not self.epoch:
            return
        short = self.target - self.sched.tokens
        if short <= 0 or (self.asked_jobs > 0 and self.asked_bytes > 0):
            return
        want = min(max(16, math.ceil(short / self.avg_cost)), self.capacity - self.held)
        n = max(0, want - self.asked_jobs)
        nbytes = max(0, math.ceil(want * self.avg_bytes * 1.25) - self.asked_bytes)
        if n <= 0 and (nbytes <= 0 or self.asked_jobs <= 0):
            return
        self.asked_jobs += n
        self.asked_bytes += nbytes
        self.tell(Kind.CREDIT, {"n": n, "bytes": nbytes})

    def _done(self, n: int) -> None:
        """n jobs left us (answered, failed or cancelled): room for more."""
        self.held -= n
        self._top_up()

    async def _listen(self) -> None:
        while True:
            for frames in await recv_batch(self.link):
                try:
                    msg = decode(frames, self.limits)
                except ProtocolError as e:
                    log.warning("bad message from broker: %s", e)
                    if e.ref is not None:  # so the broker takes back the jobs it carried
                        self.tell(
                            Kind.ERROR, {"code": str(e.code), "message": e.message, "ref": e.ref}
                        )
                    continue
                if msg.kind == Kind.JOBS:
                    self._accept(msg.body["jobs"])
                elif msg.kind == Kind.CANCEL:
                    gone = self.sched.drop(set(msg.body["ids"]))  # their places go to others
                    if gone:
                        self._done(len(gone))
                elif msg.kind == Kind.STOP:
                    self.stopping.set()
                elif msg.kind == Kind.ERROR:
                    code, epoch = msg.body.get("code"), msg.body.get("epoch")
                    if code != Code.UNKNOWN_PEER:
                        log.warning("broker says %s: %s", code, msg.body.get("message"))
                    elif epoch in (None, self.epoch):
                        self._rejoin()
                    # else: an answer to a message of an older registration, already handled

    async def _beat(self) -> None:
        parent = os.getppid()
        while True:
            await asyncio.sleep(self.cfg.workers.heartbeat_ms / 1000)  # the heartbeat period itself
            if os.getppid() != parent:  # `baton up` is gone: nobody will ever send `stop`
                log.error("parent process gone; stopping")
                self.stopping.set()
            self.report()  # doubles as the heartbeat, and keeps `baton status` current

    def _on_dead(self, cause: str) -> None:
        if self.restarting is None or self.restarting.done():
            self.restarting = asyncio.create_task(self._restart(cause))

    async def _restart(self, cause: str) -> None:
        self.serving.clear()
        self.state = "restarting"
        lost = [i for f in sorted(self.pipe.abandon(), key=lambda f: f.id) for i in f.items]
        for item in lost:
            item.attempts += 1
        spent = [i for i in lost if i.attempts >= self.cfg.jobs.max_attempts]
        self.fail(
            spent, Code.RETRIES_EXHAUSTED, f"{self.cfg.jobs.max_attempts} attempts lost: {cause}"
        )
        self.sched.requeue([i for i in lost if i.attempts < self.cfg.jobs.max_attempts])
        log.error(
            "%s; restarting the replica, %d jobs back in the queue", cause, len(lost) - len(spent)
        )
        try:
            await self.sup.restart(cause)
        except RuntimeError as e:
            # the replica cannot be brought back here; exiting lets `baton up` start a fresh
            # controller, and the broker requeues what we held
            log.error("restart failed: %s; giving up", e)
            self.failed = True
            self.stopping.set()
            return
        self.pipe.connect()
        self.state = "ready"
        self.serving.set()
        self.report()

    def _on_refused(self, body: dict[str, Any]) -> None:
        """A worker refused a batch (`failed` on the control link), or we could not read its
        output: the batch leaves the pipeline and each of its jobs ends or runs again.

        A job refused alone ends with the refusal's own code (decoding is deterministic: it
        would be refused again). A larger batch may have been refused for its size, not for any
        one job, so its jobs go back to the front of the queue as suspects, one attempt spent
        each; suspects run alone, so each reruns at most once more before it ends.
        """
        if body.get("fatal"):
            return  # the worker is exiting: the replica restart takes its batches back
        batch, stage = body.get("batch"), body.get("stage")
        where = "the controller" if stage == -1 else f"stage {stage}"
        cause = f"{where} refused the batch: {body.get('code')}: {body.get('message')}"
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 0:
            # which batch is lost cannot be told; restarting takes every batch inside back
            self._on_dead(f"{cause} (batch unnamed)")
            return
        flight = self.pipe.take(batch)
        if flight is None:
            return  # another TP rank's report of it, or a batch a restart already took back
        items = flight.items
        log.error("%s (batch %d, %d jobs)", cause, batch, len(items))
        if len(items) == 1:
            try:
                code = Code(body.get("code"))
            except ValueError:
                code = Code.INTERNAL
            self.fail(items, code, cause)
            return
        for item in items:
            item.attempts += 1
        limit = self.cfg.jobs.max_attempts
        self.fail(
            [i for i in items if i.attempts >= limit],
            Code.RETRIES_EXHAUSTED,
            f"{limit} attempts lost: {cause}",
        )
        self.sched.requeue([i for i in items if i.attempts < limit])

    def _accept(self, jobs: list[dict[str, Any]]) -> None:
        sizes = [job_size(j["id"], j["text"]) for j in jobs]
        self.held += len(jobs)
        self.asked_jobs -= len(jobs)
        self.asked_bytes -= sum(sizes)
        embed = [j for j in jobs if j["task"] == "embed"]
        encoded = iter(self.tokenizer.encode([j["text"] for j in embed]))
        items = []
        for j in jobs:
            e = next(encoded) if j["task"] == "embed" else None
            items.append(
                Item(
                    j["id"],
                    j["task"],
                    e.ids if e else [],
                    e.truncated if e else False,
                    j.get("attempts") or 0,
                    j.get("deadline"),
                )
            )
        if items:
            self.avg_cost = (self.avg_cost + sum(i.cost for i in items) / len(items)) / 2
            self.avg_bytes = (self.avg_bytes + sum(sizes) / len(sizes)) / 2
        self.sched.add(items)
        self._top_up()

    def fail(self, items: list[Item], code: Code, message: str) -> None:
        if items:
            self.results([failure(i.id, code, message) for i in items], None)
            self._done(len(items))

    def results(self, entries: list[dict[str, Any]], emb: Any) -> None:
        """`results` to the broker, cut into messages within the limit; an embedding row goes
        with its entry."""

        def build(a: int, b: int) -> list:
            part = entries[a:b]
            if emb is not None and a:
                part = [{**e, "row": e["row"] - a} for e in part]
            body = {"results": part, "stats": self.pipe.stats()}
            return self.frames(Kind.RESULTS, body, [emb[a:b]] if emb is not None else [])

        for frames in fitted(build, len(entries), self.limits.max_message_bytes):
            self.link.send_multipart(frames, copy=False)

    async def _dispatch(self) -> None:
        while True:
            await self.pipe.reserve()
            items = await self.sched.next(self.pipe.idle)
            if self.sched.late:
                late, self.sched.late = self.sched.late, []
                self.fail(late, Code.DEADLINE, "the deadline passed before the job ran")
            # both may change while we wait for the other: send only when both hold at once
            while not (self.serving.is_set() and self.pipe.may_send(items)):
                await self.serving.wait()
                if not self.pipe.may_send(items):
                    await self.pipe.empty.wait()
            await self.pipe.send(items)
            self._top_up()

    async def _collect(self) -> None:
        while True:
            got = await self.pipe.recv()
            if got is None:
                continue  # a batch from before a restart: its jobs were requeued
            flight, emb = got
            entries = [
                {"id": i.id, "status": "ok", "tokens": i.tokens, "truncated": i.truncated}
                for i in flight.items
            ]
            if emb is not None:
                for k, entry in enumerate(entries):
                    entry["row"] = k
            if self.executions is not None:
                self.executions.writelines(f"{i.id}\n" for i in flight.items)
                self.executions.flush()
            self.results(entries, emb.float() if emb is not None else None)
            self._done(len(entries))


def identity(pid: int) -> bytes:
    return f"c{pid}".encode()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m controller.controller")
    ap.add_argument("--config-json", required=True, help="the checked config, as JSON")
    ap.add_argument("--broker", required=True, help="the broker's controller endpoint")
    ap.add_argument(
        "--run-dir", default="", help="where ipc sockets live (default: a new temp dir)"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s controller %(levelname)s %(message)s"
    )
    # `baton up` decides when we stop (through the broker); a terminal's Ctrl-C reaches us too
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg = from_dict(json.loads(args.config_json))
    with contextlib.ExitStack() as stack:
        run_dir = (
            Path(args.run_dir)
            if args.run_dir
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="baton-")))
        )
        controller = Controller(cfg, args.broker, run_dir)
        uvloop.run(controller.run())
    return 1 if controller.failed else 0


if __name__ == "__main__":
    sys.exit(main())
