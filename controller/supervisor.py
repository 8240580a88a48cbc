"""Spawns a replica's workers, hears their heartbeats, notices deaths, and stops them.

Workers are real processes (`python -m workers.main SPEC`). Each talks to the supervisor over one
DEALER -> ROUTER control link, read by the wire's `serve`; any message counts as a heartbeat. A
worker is presumed dead when its process has exited or, under the wire's `Heartbeat` policy, it has
been silent for `dead_after_ms`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zmq
import zmq.asyncio

from controller.config import Config, gpu_slots
from wire.protocol import Kind, Limits, Message, encode
from wire.transport import Handler, Heartbeat, Peer, Pulse, configure, send, serve
from workers.main import Spec, device_of

log = logging.getLogger("baton.supervisor")

QUICK_S = 30.0
BACKOFF_CAP_S = 10.0


@dataclass(slots=True)
class Slot:
    """One worker position in the layout, and whichever process fills it now."""

    spec: Spec
    pulse: Pulse  # its liveness: heard from, heartbeats sent to it
    proc: subprocess.Popen | None = None
    pid: int | None = None
    state: str = "starting"  # starting -> ready -> dead | stopped
    restarts: int = 0
    cause: str = ""
    kv_blocks: int | None = None  # KV blocks its kv.memory holds (its `ready`; decoders only)
    # its weight bytes and the pool's (from its `ready`), its prefetch counts (from heartbeats)
    memory: dict[str, int] = field(default_factory=dict)
    pooled_units: list[str] = field(default_factory=list)  # its stage's units in the pool

    def row(self) -> dict[str, Any]:
        s = self.spec
        return {
            "rank": s.rank,
            "pid": self.pid,
            "stage": s.stage,
            "tp_rank": s.tp_rank,
            "device": s.device,
            "state": self.state,
            "restarts": self.restarts,
            "last_cause": self.cause,
            "resident_weight_bytes": self.memory.get("resident_weight_bytes"),
            "pooled_weight_bytes": self.memory.get("pooled_weight_bytes"),
            "pooled_units": self.pooled_units,
            "prefetches": self.memory.get("prefetches", 0),
            "stalls": self.memory.get("stalls", 0),
        }


def count(v: object) -> bool:
    """A figure a worker reports: an int (not a bool), not negative."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def kv_fields(cfg: Config) -> dict[str, Any]:
    """The [kv] keys for the workers' Spec, once it has the fields (`block_size`, `kv_memory`)."""
    fields = getattr(Spec, "__dataclass_fields__", {})
    kv = {"block_size": cfg.kv.block_size, "kv_memory": cfg.kv.memory, "compile": cfg.kv.compile}
    return {k: v for k, v in kv.items() if k in fields}


class Supervisor:
    def __init__(
        self,
        cfg: Config,
        ctx: zmq.asyncio.Context,
        run_dir: Path,
        results: str,
        pool: Path | None = None,
        replica: int = 0,
    ) -> None:
        self.cfg, self.run_dir, self.replica = cfg, run_dir, replica
        self.limits = Limits(cfg.limits.max_message_bytes, cfg.limits.max_frames)
        self.ctl = ctx.socket(zmq.ROUTER)
        configure(self.ctl, self.limits, mandatory=True)
        self.ctl.bind(f"ipc://{run_dir}/ctl")
        w = cfg.workers
        self.heartbeat = Heartbeat(w.heartbeat_ms / 1000, w.dead_after_ms / 1000)
        tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
        # every replica's workers share the host's cores
        workers = tp * pp * cfg.parallel.replicas
        threads = cfg.workers.threads or max(1, (os.cpu_count() or 1) // workers)
        shared = gpu_slots(cfg, torch.cuda.device_count() if cfg.device != "cpu" else 0)
        self.slots: list[Slot] = []
        for stage in range(pp):
            for tp_rank in range(tp):
                rank = stage * tp + tp_rank
                last = stage == pp - 1
                out = (
                    results
                    if last and tp_rank == 0
                    else ("" if last else self.inp(stage + 1, tp_rank))
                )
                self.slots.append(
                    Slot(
                        Spec(
                            rank=rank,
                            stage=stage,
                            tp_rank=tp_rank,
                            tensor=tp,
                            pipeline=pp,
                            device=device_of(cfg.device, replica * tp * pp + rank, shared),
                            model_path=cfg.model.path,
                            max_seq_length=cfg.model.max_seq_length,
                            dtype=cfg.model.dtype,
                            encoder_kernel=cfg.model.encoder_kernel,
                            screen_greedy=cfg.model.screen_greedy,
                            weight_budget=cfg.memory.weight_budget,
                            prefetch=cfg.memory.prefetch,
                            prefetch_distance=cfg.memory.prefetch_distance,
                            pool=str(pool) if pool and cfg.memory.weight_budget < 1 else "",
                            threads=threads,
                            ctl=f"ipc://{run_dir}/ctl",
                            inp=self.inp(stage, tp_rank),
                            out=out,
                            dist_init=f"file://{run_dir}/stage{stage}.store",
                            heartbeat_ms=cfg.workers.heartbeat_ms,
                            dead_after_ms=cfg.workers.dead_after_ms,
                            max_message_bytes=cfg.limits.max_message_bytes,
                            max_frames=cfg.limits.max_frames,
                            stages=list(cfg.parallel.stages),
                            shared_reduce=cfg.parallel.shared_reduce,
                            **kv_fields(cfg),
                        ),
                        self.heartbeat.pulse(time.monotonic()),
                    )
                )
        self.all_ready = asyncio.Event()
        self.restarted = -QUICK_S  # when the replica was last restarted
        self.quick = 0  # restarts in a row that came sooner than QUICK_S after the one before
        self.on_change: Callable[[], None] = lambda: None
        self.on_failed: Callable[[dict[str, Any]], None] = lambda body: None
        self.on_dead: Callable[[str], None] = lambda cause: None

    def inp(self, stage: int, tp_rank: int) -> str:
        return f"ipc://{self.run_dir}/w{stage * self.cfg.parallel.tensor + tp_rank}.in"

    def first_stage(self) -> list[str]:
        return [s.spec.inp for s in self.slots if s.spec.stage == 0]

    def kv_blocks(self) -> int | None:
        """The KV blocks every worker holds (each holds its own layers and heads of every
        block): the minimum over the workers; None when no worker has a KV cache."""
        counts = [s.kv_blocks for s in self.slots if s.kv_blocks is not None]
        return min(counts) if counts else None

    def rows(self) -> list[dict[str, Any]]:
        return [{"replica": self.replica, **s.row()} for s in self.slots]

    def pool_bytes(self) -> int:
        """The shared pool's size (once, however many workers map it), from their `ready`."""
        return max((s.memory.get("pool_bytes", 0) for s in self.slots), default=0)

    def spawn(self) -> None:
        for slot in self.slots:
            store = Path(slot.spec.dist_init.removeprefix("file://"))
            store.unlink(missing_ok=True)  # a stale store would hand the new group old ranks
            slot.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.main", slot.spec.to_json()],
                stdin=subprocess.DEVNULL,
            )
            slot.pid, slot.state = slot.proc.pid, "starting"
            slot.pulse = self.heartbeat.pulse(time.monotonic())
            slot.kv_blocks = None  # a fresh worker says again in its `ready`

    async def wait_ready(self) -> None:
        """All workers ready, or an error naming the one that was not (bounded by start_timeout_s)."""
        try:
            async with asyncio.timeout(self.cfg.workers.start_timeout_s):
                await self.all_ready.wait()
        except TimeoutError:
            late = [s.spec.rank for s in self.slots if s.state != "ready"]
            raise RuntimeError(
                f"workers {late} not ready after {self.cfg.workers.start_timeout_s} s"
            ) from None

    async def run(self) -> None:
        await asyncio.gather(self._listen(), self._watch())

    async def _listen(self) -> None:
        await serve(
            self.ctl,
            self.limits,
            {
                Kind.HELLO: self._worker(self._hello),
                Kind.READY: self._worker(self._ready),
                Kind.FAILED: self._worker(lambda _slot, msg: self.on_failed(msg.body)),
                Kind.HEARTBEAT: self._worker(self._counters),  # its arrival is what counts most
            },
            routed=True,
            refused=lambda _peer, e: log.warning("bad control message: %s %s", e.code, e.message),
            log=log,
        )

    def _worker(self, handler: Callable[[Slot, Message], None]) -> Handler:
        """A handler for a message from the worker its `rank` names; others are dropped."""

        def known(_peer: Peer, msg: Message) -> None:
            rank = msg.body.get("rank")
            if not isinstance(rank, int) or not 0 <= rank < len(self.slots):
                return
            slot = self.slots[rank]
            slot.pulse.hear(time.monotonic())  # any traffic is a heartbeat
            handler(slot, msg)

        return known

    def _hello(self, slot: Slot, msg: Message) -> None:
        slot.pid = msg.body.get("pid", slot.pid)

    def _counters(self, slot: Slot, msg: Message) -> None:
        """A worker's heartbeat carries its running counts (a pool's prefetches and stalls)."""
        for k in ("prefetches", "stalls"):
            if count(v := msg.body.get(k)):
                slot.memory[k] = v

    def _ready(self, slot: Slot, msg: Message) -> None:
        kv = msg.body.get("kv_blocks")
        slot.kv_blocks = kv if count(kv) else None
        slot.memory = {
            k: v
            for k in ("resident_weight_bytes", "pooled_weight_bytes", "pool_bytes")
            if count(v := msg.body.get(k))
        }
        units = msg.body.get("pooled_units")
        ok = isinstance(units, list) and all(isinstance(u, str) for u in units)
        slot.pooled_units = units if ok else []
        slot.state = "ready"
        if all(s.state == "ready" for s in self.slots):
            self.all_ready.set()
        self.on_change()

    async def _watch(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.heartbeat.period_s)  # the heartbeat period itself
            now = time.monotonic()
            if self.heartbeat.stalled(now - last):
                # the workers' silence is ours (their heartbeats wait unread): judge from now on
                log.warning("the supervisor was stalled for %.1f s", now - last)
                for slot in self.slots:
                    slot.pulse.hear(now)
            last = now
            for slot in self.slots:
                if slot.state not in ("starting", "ready") or slot.proc is None:
                    continue
                code = slot.proc.poll()
                if code is not None:
                    self._dead(slot, f"exited with code {code}")
                elif slot.state == "ready" and slot.pulse.silent(now):
                    self._dead(slot, f"silent for {slot.pulse.quiet_s(now):.1f} s")
                elif slot.pulse.due(now) and send(
                    self.ctl, [f"w{slot.spec.rank}".encode(), *encode(Kind.HEARTBEAT)]
                ):
                    slot.pulse.beat(now)

    def _dead(self, slot: Slot, cause: str) -> None:
        log.error("worker %d (pid %s) dead: %s", slot.spec.rank, slot.pid, cause)
        slot.state, slot.cause = "dead", cause
        self.all_ready.clear()
        self.on_change()
        self.on_dead(f"worker {slot.spec.rank} {cause}")

    async def restart(self, cause: str) -> None:
        """Replace every worker of the replica: a TP group that lost a member cannot be mended."""
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.state = "stopping"  # so the watch loop does not report it dead too
                slot.proc.kill()  # its peers may be blocked in a collective with the dead one
                await asyncio.to_thread(slot.proc.wait, 10)
            slot.restarts += 1
            if slot.state != "dead":
                slot.cause = f"replica restarted: {cause}"
        # a replica that keeps dying young is restarted ever more slowly, not in a tight loop
        now = time.monotonic()
        self.quick = self.quick + 1 if now - self.restarted < QUICK_S else 0
        self.restarted = now
        if self.quick:
            await asyncio.sleep(min(BACKOFF_CAP_S, 0.25 * 2**self.quick))  # a backoff delay
        self.spawn()
        self.on_change()
        await self.wait_ready()

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Ask every worker to stop, then make sure: terminate, and kill what still lingers."""
        for slot in self.slots:
            send(self.ctl, [f"w{slot.spec.rank}".encode(), *encode(Kind.STOP)])
        deadline = time.monotonic() + timeout_s
        for slot in self.slots:
            if slot.proc is None:
                continue
            left = max(0.1, deadline - time.monotonic())
            try:
                await asyncio.to_thread(slot.proc.wait, left)
            except subprocess.TimeoutExpired:
                slot.proc.kill()
                await asyncio.to_thread(slot.proc.wait, 5)
            if slot.state != "dead":
                slot.state = "stopped"
        self.ctl.close(0)
