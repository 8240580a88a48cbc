"""The controller of one model replica: asyncio on uvloop, one process.

It registers with the broker, asks for work by credits, admits jobs (tasks.py), forms
padding-free micro-batches (scheduler.py), keeps several in flight through the pipeline, returns
results and streamed tokens, and supervises its workers. When a worker dies, the whole replica is
restarted (its TP groups cannot be mended piecemeal): the one-shot batches that were inside go back
to the front of the queue, and every generating sequence is recomputed from its prompt and the
tokens it has so far (the workers' KV cache died with them).
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
import time
from pathlib import Path
from typing import Any

import uvloop
import zmq
import zmq.asyncio

from broker.jobs import failure
from controller.block_manager import BlockManager
from controller.config import Config, from_dict
from controller.pipeline import Landed, Pipeline
from controller.scheduler import MicroBatch, Scheduler
from controller.sequence import Refusal, Sequence
from controller.supervisor import Supervisor
from controller.tasks import (
    Codec,
    Generate,
    Task,
    bounds,
    model_info,
    tasks_of,
    timed,
)
from wire.protocol import (
    Code,
    Kind,
    Limits,
    Message,
    ProtocolError,
    encode,
    fitted,
    job_size,
)
from wire.transport import Heartbeat, Peer, configure, serve
from workers.models import plan
from workers.pool import path_for

log = logging.getLogger("baton.controller")

# our exit code when the workers died before the replica was first ready: `baton up` gives up
# (and exits non-zero) instead of starting us again
UNSTARTABLE = 3
# priority-0 jobs the broker may send us past our credit, one at a time (the urgent lane): an
# interactive job then reaches our queue, where it goes first, even while batch work fills it
URGENT = 1


class Controller:
    def __init__(self, cfg: Config, broker: str, run_dir: Path, replica: int = 0) -> None:
        # sockets of our own: orphans of a dead predecessor must not reach our workers
        pool = path_for(run_dir)  # the fleet's, made by `baton up` (when anything is pooled)
        run_dir = run_dir / f"c{os.getpid()}"
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # ipc sockets: ours alone
        self.cfg, self.run_dir = cfg, run_dir
        self.limits = Limits(cfg.limits.max_message_bytes, cfg.limits.max_frames)
        self.info = model_info(cfg.model.path, cfg.model.max_seq_length)
        self.model = cfg.model.name or self.info.name
        self.tasks: dict[str, Task] = tasks_of(self.info, Codec(self.info))
        self.ctx = zmq.asyncio.Context()
        self.link = self.ctx.socket(zmq.DEALER)
        # a fixed identity lets `baton up` tell the broker which controller's jobs to requeue
        self.link.setsockopt(zmq.IDENTITY, identity(os.getpid()))
        configure(self.link, self.limits)
        self.link.connect(broker)
        w = cfg.workers  # one heartbeat policy for the broker link and the workers' link
        self.heartbeat = Heartbeat(w.heartbeat_ms / 1000, w.dead_after_ms / 1000)
        results = f"ipc://{run_dir}/results"
        self.replica = replica
        self.sup = Supervisor(cfg, self.ctx, run_dir, results, pool, replica)
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
            block_size=cfg.kv.block_size,
        )
        self.pipe.on_refused = self._on_refused
        # a decoder's block manager comes with the workers' `ready` (their KV capacity)
        self.sched = Scheduler(
            cfg.batching.max_batch_tokens,
            cfg.batching.max_wait_ms,
            eos_token_id=self.info.extra.get("eos_token_ids") or self.info.eos_token_id,
            groups=cfg.parallel.pipeline,
            static=cfg.batching.static,
            yield_tokens=cfg.batching.yield_tokens,
        )
        # jobs held here (queued or in flight) at most; enough to keep every in-flight slot full
        self.capacity = cfg.pipeline.max_inflight * max(64, cfg.batching.max_batch_tokens // 8)
        # Credit: ask the broker for more only while fewer than two batches' worth of tokens wait
        # here (and, for a decoder, KV blocks are free for them), so the rest of the backlog
        # waits at the broker, where clients are served in turn and messages are cut to the size
        # limit. Credit is counted in jobs and in bytes; the `asked_*` fields mirror what the
        # broker still owes us under it.
        self.target = 2 * cfg.batching.max_batch_tokens
        self.held = 0  # jobs here, queued or in flight
        self.asked_jobs = self.asked_bytes = 0
        self.lane = False  # the broker holds the urgent lane open for us (`_open_lane`)
        self.avg_cost, self.avg_bytes = 64.0, 512.0  # per job, from the jobs seen so far
        self.epoch = 0  # our registrations with the broker so far
        self.stopping = asyncio.Event()
        self.failed = False  # stopping because the replica could not be restarted
        self.unstartable = asyncio.Event()  # a worker died before the replica was first ready
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
            {
                "workers": self.sup.rows(),
                "pool_bytes": self.sup.pool_bytes(),
                "state": self.state,
                "stats": self.stats(),
            },
        )

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.pipe.stats(), **self.sched.stats()}
        if self.sched.bm is not None:
            out["kv"] = self.sched.bm.stats()
        return out

    def _size_kv(self) -> bool:
        """(Re)size the KV cache to what every worker holds; True if it changed. Every
        generating sequence is recomputed then: the blocks it held are gone or renumbered."""
        if not self.info.decoder:
            return False
        blocks = self.sup.kv_blocks()
        if not blocks:
            raise RuntimeError("the workers of a decoder reported no KV blocks (kv.memory?)")
        bm = self.sched.bm
        if bm is not None and bm.num_blocks == blocks:
            return False
        if bm is None:
            self.sched.bm = BlockManager(blocks, self.cfg.kv.block_size, self.cfg.kv.prefix_sharing)
        else:
            self.sched.recompute_all(blocks)
        gen = self.tasks["generate"]
        assert isinstance(gen, Generate)
        gen.kv_tokens = blocks * self.cfg.kv.block_size
        log.info("KV cache: %d blocks of %d tokens", blocks, self.cfg.kv.block_size)
        return True

    async def run(self) -> None:
        self.sup.spawn()
        supervise = asyncio.create_task(self.sup.run())
        ready = asyncio.create_task(self.sup.wait_ready())
        broken = asyncio.create_task(self.unstartable.wait())
        await asyncio.wait({ready, broken}, return_when=asyncio.FIRST_COMPLETED)
        broken.cancel()
        if not ready.done():
            ready.cancel()
            supervise.cancel()
            await asyncio.gather(ready, supervise, return_exceptions=True)
            await self.sup.stop()
            self.pipe.close()
            self.link.close(0)
            self.ctx.term()
            return
        ready.result()  # the start timeout, raised
        self._size_kv()
        self.state = "ready"
        self.serving.set()
        self._register()
        loops = [
            asyncio.create_task(c)
            for c in (self._listen(), self._dispatch(), self.pipe.collect(self._land), self._beat())
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
        pp = self.cfg.parallel.pipeline
        layout = {
            "tensor": self.cfg.parallel.tensor,
            "pipeline": pp,
            # each stage's first and last layer, as the workers split the model
            "stages": [
                [r.start, r.stop - 1] for r in plan(self.info, pp, self.cfg.parallel.stages)
            ],
        }
        body = {
            "model": self.model,
            "tasks": list(self.tasks),
            "layout": layout,
            "workers": self.sup.rows(),
            "pool_bytes": self.sup.pool_bytes(),
            "pid": os.getpid(),
            "replica": self.replica,
            "state": self.state,
            **bounds(self.info),
        }
        self.tell(Kind.READY, body)
        self.lane = False  # a fresh registration: the broker holds no urgent lane for us
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
        self._open_lane()
        short = self.target - self.sched.tokens
        if short <= 0 or (self.asked_jobs > 0 and self.asked_bytes > 0):
            return
        bm = self.sched.bm
        if bm is not None and bm.num_free * bm.block_size <= self.sched.tokens:
            return  # the KV cache is full: new prompts would only wait here
        want = min(max(16, math.ceil(short / self.avg_cost)), self.capacity - self.held)
        n = max(0, want - self.asked_jobs)
        nbytes = max(0, math.ceil(want * self.avg_bytes * 1.25) - self.asked_bytes)
        if n <= 0 and (nbytes <= 0 or self.asked_jobs <= 0):
            return
        self.asked_jobs += n
        self.asked_bytes += nbytes
        self.tell(Kind.CREDIT, {"n": n, "bytes": nbytes})

    def _open_lane(self) -> None:
        """Keep the urgent lane open at the broker while no interactive job waits here: one then
        reaches us past our credit, ahead of the batch work queued here. Not while one waits:
        another would only queue behind it, and a backlog of priority-0 jobs would pour in one
        by one past the credit that keeps it at the broker."""
        head = self.sched.waiting[0] if self.sched.waiting else None
        if self.lane or (head is not None and head.priority == 0):
            return
        self.lane = True
        self.tell(Kind.CREDIT, {"n": 0, "bytes": 0, "urgent": URGENT})

    def _done(self, n: int) -> None:
        """n jobs left us (answered, failed or cancelled): room for more."""
        self.held -= n
        self._top_up()

    async def _listen(self) -> None:
        await serve(
            self.link,
            self.limits,
            {
                Kind.JOBS: lambda _peer, msg: self._accept(
                    msg.body["jobs"], msg.body.get("urgent") is True
                ),
                Kind.CANCEL: self._cancel,
                Kind.STOP: lambda _peer, _msg: self.stopping.set(),
                Kind.ERROR: self._broker_error,
                Kind.HEARTBEAT: lambda _peer, _msg: None,  # the broker's; nothing to do
            },
            refused=self._unreadable,
            log=log,
        )

    def _unreadable(self, _peer: Peer, e: ProtocolError) -> None:
        log.warning("bad message from broker: %s %s", e.code, e.message)
        if e.ref is not None:  # so the broker takes back the jobs it carried
            self.tell(Kind.ERROR, {"code": str(e.code), "message": e.message, "ref": e.ref})

    def _cancel(self, _peer: Peer, msg: Message) -> None:
        # their places (and KV blocks) go to others at once
        gone = self.sched.drop(set(msg.body["ids"]))
        if gone:
            self._done(len(gone))

    def _broker_error(self, _peer: Peer, msg: Message) -> None:
        code, epoch = msg.body.get("code"), msg.body.get("epoch")
        if code != Code.UNKNOWN_PEER:
            log.warning("broker says %s: %s", code, msg.body.get("message"))
        elif epoch in (None, self.epoch):
            self._rejoin()
        # else: an answer to a message of an older registration, already handled

    async def _beat(self) -> None:
        parent = os.getppid()
        while True:
            await asyncio.sleep(self.heartbeat.period_s)  # the heartbeat period itself
            if os.getppid() != parent:  # `baton up` is gone: nobody will ever send `stop`
                log.error("parent process gone; stopping")
                self.stopping.set()
            self.report()  # doubles as the heartbeat, and keeps `baton status` current

    def _on_dead(self, cause: str) -> None:
        if self.state == "starting":
            # it failed before serving anything (a bad checkpoint, too little memory, no pool):
            # a restart would fail alike, so `baton up` is told at once (our exit code)
            log.error("%s while the replica was starting; giving up", cause)
            self.unstartable.set()
            return
        if self.restarting is None or self.restarting.done():
            self.restarting = asyncio.create_task(self._restart(cause))

    async def _restart(self, cause: str) -> None:
        self.serving.clear()
        self.state = "restarting"
        limit = self.cfg.jobs.max_attempts
        lost = [f.batch for f in sorted(self.pipe.abandon(), key=lambda f: f.id)]
        oneshot = [s for b in lost if b.oneshot for s in b.seqs]
        # a generate step inside when the worker died is an attempt lost, like a one-shot batch
        stepping = [
            s for b in lost if not b.oneshot for s in b.seqs if not (s.is_finished() or s.filler)
        ]
        for seq in (*oneshot, *stepping):
            seq.attempts += 1
            seq.suspect = True
        spent = [s for s in (*oneshot, *stepping) if s.attempts >= limit]
        for seq in spent:
            if not seq.oneshot:
                self.sched.finish(seq)
        self.fail(spent, Code.RETRIES_EXHAUSTED, f"{limit} attempts lost: {cause}")
        self.sched.requeue([s for s in oneshot if s.attempts < limit])
        # the KV cache died with the workers: every generating sequence starts over from its
        # prompt and the tokens it has (those already streamed are not sent again)
        recomputed = len(self.sched.running)
        self.sched.recompute_all()
        log.error(
            "%s; restarting the replica, %d jobs back in the queue, %d sequences to recompute",
            cause,
            len(oneshot) - sum(1 for s in spent if s.oneshot),
            recomputed,
        )
        try:
            await self.sup.restart(cause)
            self._size_kv()
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
        one job, so its jobs run again as suspects, one attempt spent each: one-shot jobs from
        the front of the queue, generating sequences from where they were (their blocks kept);
        suspects run alone, so each reruns at most once more before it ends.
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
        mb = flight.batch
        self.sched.landed(mb)
        seqs = [s for s in mb.seqs if not s.is_finished() or mb.oneshot]
        log.error("%s (batch %d, %d jobs)", cause, batch, len(mb))
        if len(mb) == 1:
            try:
                code = Code(body.get("code"))
            except ValueError:
                code = Code.INTERNAL
            for seq in seqs:
                if not seq.oneshot:
                    self.sched.finish(seq)
            self.fail(seqs, code, cause)
            return
        limit = self.cfg.jobs.max_attempts
        for seq in seqs:
            seq.attempts += 1
            seq.suspect = True
        spent = [s for s in seqs if s.attempts >= limit]
        for seq in spent:
            if not seq.oneshot:
                self.sched.finish(seq)
        self.fail(spent, Code.RETRIES_EXHAUSTED, f"{limit} attempts lost: {cause}")
        again = [s for s in seqs if s.attempts < limit]
        if mb.oneshot:
            self.sched.requeue(again)
        else:
            self.sched.release(again)

    def _accept(self, jobs: list[dict[str, Any]], urgent: bool = False) -> None:
        """Jobs from the broker: under our credit, or (`urgent`) a priority-0 job through the
        urgent lane, which is opened again at once for the next one."""
        arrived = time.monotonic()  # before tokenizing: that is waiting too
        sizes = [job_bytes(j) for j in jobs]
        self.held += len(jobs)
        if urgent:
            self.lane = False  # taken by this job; opened again once no interactive job waits
        else:
            self.asked_jobs -= len(jobs)
            self.asked_bytes -= sum(sizes)
        # each task admits its jobs in one call (one batched tokenizer call per task)
        by_task: dict[str, list[int]] = {}
        for k, j in enumerate(jobs):
            by_task.setdefault(j.get("task"), []).append(k)
        admitted: list[Sequence | Refusal | None] = [None] * len(jobs)
        for name, ks in by_task.items():
            task = self.tasks.get(name)
            if task is None:
                for k in ks:
                    admitted[k] = Refusal(str(Code.UNKNOWN_TASK), f"this model does not {name}")
                continue
            for k, got in zip(ks, task.admit([jobs[k] for k in ks]), strict=True):
                admitted[k] = got
        seqs = [a for a in admitted if isinstance(a, Sequence)]
        for s in seqs:
            s.arrived = arrived
        refused = [(j, a) for j, a in zip(jobs, admitted, strict=True) if isinstance(a, Refusal)]
        if refused:
            self.results([failure(j["id"], r.code, r.message) for j, r in refused], None)
            self.held -= len(refused)
        if seqs:
            self.avg_cost = (self.avg_cost + sum(s.cost for s in seqs) / len(seqs)) / 2
            self.avg_bytes = (self.avg_bytes + sum(sizes) / len(sizes)) / 2
        self.sched.add(seqs)
        self._top_up()

    def fail(self, seqs: list[Sequence], code: Code | str, message: str) -> None:
        if seqs:
            self.results([timed(failure(s.id, code, message), s) for s in seqs], None)
            self._done(len(seqs))

    def results(self, entries: list[dict[str, Any]], emb: Any) -> None:
        """`results` to the broker, cut into messages within the limit; an embedding row goes
        with its entry."""

        def build(a: int, b: int) -> list:
            part = entries[a:b]
            if emb is not None and a:
                part = [{**e, "row": e["row"] - a} for e in part]
            body = {"results": part, "stats": self.stats()}
            return self.frames(Kind.RESULTS, body, [emb[a:b]] if emb is not None else [])

        for frames in fitted(build, len(entries), self.limits.max_message_bytes):
            self.link.send_multipart(frames, copy=False)

    def stream(self, seqs: list[Sequence]) -> None:
        """`tokens` to the broker: each sequence's tokens not sent yet, all in one message (cut
        to the limit). `index` counts the generated tokens before the delta, so a client keeps
        its place across a recompute here or a restart elsewhere."""
        deltas = []
        for s in seqs:
            new = s.completion_token_ids[s.num_streamed :]
            if new:
                deltas.append({"id": s.id, "index": s.num_streamed, "token_ids": new})
                s.num_streamed += len(new)
        if not deltas:
            return

        def build(a: int, b: int) -> list:
            return self.frames(Kind.TOKENS, {"deltas": deltas[a:b]})

        for frames in fitted(build, len(deltas), self.limits.max_message_bytes):
            self.link.send_multipart(frames, copy=False)

    def _set_aside(self) -> None:
        """Fail what the scheduler set aside: past its deadline, or too big for the KV cache."""
        if self.sched.late:
            late, self.sched.late = self.sched.late, []
            self.fail(late, Code.DEADLINE, "the deadline passed before the job ran")
        if self.sched.unfit:
            unfit, self.sched.unfit = self.sched.unfit, []
            self.fail(unfit, Code.PROMPT_TOO_LONG, "the sequence no longer fits the KV cache")

    async def _dispatch(self) -> None:
        while True:
            await self.pipe.reserve()
            while True:
                batch = await self.sched.next(self.pipe.idle)
                self._set_aside()
                # both may change while we wait for the other: send only when both hold at once
                while not (self.serving.is_set() and self.pipe.may_send(batch)):
                    await self.serving.wait()
                    if not self.pipe.may_send(batch):
                        await self.pipe.empty.wait()
                if batch.oneshot or batch.epoch == self.sched.epoch:
                    break
                # formed before a restart took the KV back: its sequences are queued again
            if await self.pipe.send(batch) is None:
                self.sched.landed(batch)  # every sequence of it was cancelled meanwhile
            self._top_up()

    def _land(self, landed: Landed) -> None:
        """A batch out of the last stage (`Pipeline.collect` drops stale and refused ones)."""
        if landed.flight.batch.oneshot:
            self._finish_oneshot(landed)
        else:
            self._finish_step(landed.flight.batch, landed.token_ids or [])

    def _finish_oneshot(self, landed: Landed) -> None:
        mb, emb = landed.flight.batch, landed.emb
        task = self.tasks[mb.task]
        entries = [
            timed(task.result(s, k if emb is not None else None), s) for k, s in enumerate(mb.seqs)
        ]
        self._executed(mb.seqs)
        self.results(entries, emb.float() if emb is not None else None)
        self._done(len(entries))

    def _finish_step(self, mb: MicroBatch, token_ids: list[int]) -> None:
        """A generate step is back: its tokens streamed, its finished sequences answered, and
        its sequences schedulable again."""
        stepped, finished = self.sched.postprocess(mb, token_ids)
        self.stream(stepped)
        if finished:
            task = self.tasks["generate"]
            self._executed(finished)
            self.results([timed(task.result(s), s) for s in finished], None)
            self._done(len(finished))

    def _executed(self, seqs: list[Sequence]) -> None:
        if self.executions is not None:
            self.executions.writelines(f"{s.id}\n" for s in seqs)
            self.executions.flush()


def job_bytes(job: dict[str, Any]) -> int:
    """What the broker counted for this job against our byte credit."""
    text = job.get("text")
    return job_size(
        job["id"], text if isinstance(text, str) else "", job.get("token_ids"), job.get("params")
    )


def identity(pid: int) -> bytes:
    return f"c{pid}".encode()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m controller.controller")
    ap.add_argument("--config-json", required=True, help="the checked config, as JSON")
    ap.add_argument("--broker", required=True, help="the broker's controller endpoint")
    ap.add_argument(
        "--run-dir", default="", help="where ipc sockets live (default: a new temp dir)"
    )
    ap.add_argument(
        "--replica", type=int, default=0, help="which of parallel.replicas this one is (0 first)"
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
        controller = Controller(cfg, args.broker, run_dir, args.replica)
        uvloop.run(controller.run())
    if controller.unstartable.is_set():
        return UNSTARTABLE
    return 1 if controller.failed else 0


if __name__ == "__main__":
    sys.exit(main())
