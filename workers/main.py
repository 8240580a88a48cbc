"""One worker process: one device, one TP shard of one pipeline stage's layers.

The loop waits (bounded) on two sockets: `ctl`, a DEALER to its controller (hello, ready,
heartbeats both ways, stop), and `inp`, a PULL that delivers micro-batches in order. It is
synchronous (torch runs between polls): each ready message is decoded and dispatched by the wire's
`drain`, the same step the asyncio loops' `serve` takes, and the controller's liveness is judged by
the wire's `Heartbeat` policy. Each batch is run through the stage and pushed on: to the same TP rank of the next stage, or, from the last
stage's rank 0, to the controller. Every rank of a stage sees the same batches in the same order,
so their collectives line up without any extra coordination.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import zmq

from wire.protocol import Code, Kind, Limits, Message, ProtocolError, encode
from wire.transport import Heartbeat, Peer, configure, drain
from workers.layers.parallel import close, init_tp_group
from workers.layers.screen import screens
from workers.layers.shared_reduce import paths
from workers.models import load_info
from workers.pool import Pooled, Region, layout
from workers.runner import ModelRunner

log = logging.getLogger("baton.worker")

# Chaos testing: a worker that sees this token id in a batch dies on the spot, as a worker
# crashing on one poisonous input would. Unset in normal operation.
FAULT_TOKEN = int(os.environ.get("BATON_FAULT_EXIT_ON_TOKEN", "-1"))
# Chaos testing: "STAGE:BYTES" makes the workers of that stage read batches under a message limit
# of BYTES instead of limits.max_message_bytes, so a batch that fits everywhere else is refused
# there, by decode itself, as one over the real limit would be. Unset in normal operation.
FAULT_STAGE, _, FAULT_LIMIT = os.environ.get("BATON_FAULT_STAGE_LIMIT", "-1:0").partition(":")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class Spec:
    """Everything a worker needs, passed as JSON on its command line by the supervisor."""

    rank: int
    stage: int
    tp_rank: int
    tensor: int
    pipeline: int
    device: str
    model_path: str
    max_seq_length: int
    dtype: str
    threads: int
    ctl: str  # controller's ROUTER
    inp: str  # this worker's PULL, bound here
    out: str  # next stage's PULL (or the controller's) to PUSH to; "" = compute only
    dist_init: str  # torch.distributed init_method for this stage's TP group
    heartbeat_ms: int
    dead_after_ms: int
    max_message_bytes: int
    max_frames: int
    block_size: int = 16  # KV cache slots per block (decoders)
    kv_memory: float = (
        0.25  # KV cache: <= 1 a fraction of the memory free after weights, else bytes
    )
    compile: bool = False  # decode attention compiled to read the paged cache in place
    encoder_kernel: bool = False  # the C++ packed attention and add-norm (CPU)
    screen_greedy: bool = False  # model.screen_greedy
    weight_budget: float = 1.0  # memory.weight_budget
    pool: str = ""  # the pool's shared-memory file (workers/pool.py); "" = nothing pooled
    prefetch: str = "auto"  # memory.prefetch
    prefetch_distance: int = 2  # memory.prefetch_distance
    stages: list[int] = field(default_factory=list)  # layers per stage; empty = planned
    shared_reduce: bool = False  # parallel.shared_reduce: CPU all-reduces in shared memory

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @property
    def last(self) -> bool:
        return self.stage == self.pipeline - 1


def device_of(base: str, rank: int, slots: int = 0) -> str:
    """`cpu` for every rank; `cuda` / `cuda:N` give rank r the GPU N + r, or N + r mod `slots`
    where stages share `slots` GPUs (controller.config.gpu_slots)."""
    if base == "cpu":
        return "cpu"
    first = int(base.partition(":")[2] or 0)
    return f"cuda:{first + (rank % slots if slots else rank)}"


class Worker:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.limits = Limits(spec.max_message_bytes, spec.max_frames)
        self.batch_limits = self.limits  # what a batch arriving here must fit
        if int(FAULT_STAGE) == spec.stage:
            self.batch_limits = Limits(int(FAULT_LIMIT), spec.max_frames)
        self.ctx = zmq.Context()
        self.ctl = self.ctx.socket(zmq.DEALER)
        self.ctl.setsockopt(zmq.IDENTITY, f"w{spec.rank}".encode())
        configure(self.ctl)
        self.ctl.connect(spec.ctl)
        self.inp = self.ctx.socket(zmq.PULL)
        configure(self.inp, self.limits)
        self.inp.bind(spec.inp)
        self.out = None
        if spec.out:
            self.out = self.ctx.socket(zmq.PUSH)
            configure(self.out)
            self.out.connect(spec.out)
        self.heartbeat = Heartbeat(spec.heartbeat_ms / 1000, spec.dead_after_ms / 1000)
        self.controller = self.heartbeat.pulse(time.monotonic())  # the controller's liveness
        self.stopping = False

    def tell(self, kind: Kind, **body: object) -> None:
        self.ctl.send_multipart(encode(kind, {"rank": self.spec.rank, **body}))
        self.controller.beat(time.monotonic())  # any message is a heartbeat to the controller

    def start(self) -> None:
        s = self.spec
        self.tell(Kind.HELLO, stage=s.stage, tp_rank=s.tp_rank, pid=os.getpid(), device=s.device)
        torch.set_num_threads(s.threads)
        info = load_info(s.model_path)
        if s.max_seq_length:
            info.max_seq_length = s.max_seq_length
        store = Path(s.dist_init.removeprefix("file://"))
        shared = paths(store) if s.shared_reduce and s.tensor > 1 else None
        self.tp = init_tp_group(s.tp_rank, s.tensor, s.dist_init, s.device, shared=shared)
        screen = screens(s.screen_greedy, s.device)
        plan = layout(
            info, s.tensor, s.pipeline, s.dtype, s.stages, s.weight_budget, s.device, screen
        )
        region = Region.open(Path(s.pool), plan.size) if plan.of(s.stage, s.tp_rank) else None
        if region is not None and s.device.startswith("cuda"):
            region.pin()
        self.pooled = Pooled.of(region, plan, s.stage, s.tp_rank) if region else None
        self.runner = ModelRunner(
            info,
            s.stage,
            s.pipeline,
            self.tp,
            s.device,
            DTYPES[s.dtype],
            s.block_size,
            s.kv_memory,
            s.compile,
            s.stages,
            s.encoder_kernel,
            self.pooled,
            s.prefetch,
            s.prefetch_distance,
            screen,  # the plan counts a private head's int8 copy against the budget
        )
        buffers = self.runner.prefetcher.buffer_bytes if self.runner.prefetcher else 0
        release_freed_memory()
        self.tell(
            Kind.READY,
            kv_blocks=self.runner.num_blocks,
            resident_weight_bytes=plan.private[s.stage, s.tp_rank] + buffers,
            pooled_weight_bytes=plan.pooled[s.stage, s.tp_rank],
            pool_bytes=plan.size if self.pooled else 0,
            pooled_units=self.pooled.units if self.pooled else [],
        )

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.ctl, zmq.POLLIN)
        poller.register(self.inp, zmq.POLLIN)
        control = {Kind.STOP: self._stop, Kind.HEARTBEAT: lambda _peer, _msg: None}
        batches = {Kind.BATCH: self.step}
        parent = os.getppid()
        while True:
            events = dict(poller.poll(self.spec.heartbeat_ms))  # bounded: never an infinite poll
            now = time.monotonic()
            if self.ctl in events:
                self.controller.hear(now)  # any traffic is a heartbeat
                drain(self.ctl, self.limits, control, refused=self._unreadable, log=log)
                if self.stopping:
                    return
            if self.inp in events:
                drain(self.inp, self.batch_limits, batches, most=1, refused=self._refused, log=log)
            if self.controller.due(now):
                self.tell(Kind.HEARTBEAT, **self.runner.counters())
            # an orphan must not linger: its controller is gone or has gone silent
            if os.getppid() != parent or self.controller.silent(now):
                log.error("worker %d: controller gone; exiting", self.spec.rank)
                return

    def _stop(self, _peer: Peer, _msg: Message) -> None:
        self.stopping = True

    def _unreadable(self, _peer: Peer, e: ProtocolError) -> None:
        log.warning("worker %d: bad control message: %s %s", self.spec.rank, e.code, e.message)

    def step(self, _peer: Peer, msg: Message) -> None:
        """Run one batch (decoded by `drain` under the batch limits) and pass it on. A batch
        refused here (unreadable, or its result too large to send) goes to `_refused`: reported
        `failed` and dropped, and the controller takes it out of the pipeline. Every TP rank of a
        stage refuses the same batch alike (their inputs are identical), so their collectives
        stay in step. Anything else is reported as fatal and ends the worker: its TP group may be
        broken, and the replica restart takes the batch back."""
        batch = -1
        try:
            batch = msg.body["batch"]
            if (
                FAULT_TOKEN >= 0
                and self.spec.stage == 0
                and msg.tensors
                and bool((msg.tensors[0] == FAULT_TOKEN).any())
            ):
                os._exit(70)
            step = self.runner.run(msg.body, msg.tensors)
            if self.out is None:
                return
            kind = Kind.OUTPUT if self.spec.last else Kind.BATCH
            body = {**msg.body, **step.body}
            if self.spec.last and msg.body.get("task") == "generate":
                body = {"batch": batch, "ref": batch, **step.body}  # the header has done its work
            sent = encode(kind, body, step.tensors)
            size = sum(len(f) for f in sent)
            if size > self.limits.max_message_bytes:
                # the receiver would refuse it, or past ZeroMQ's hard cap never see it at all
                where = "the controller" if self.spec.last else f"stage {self.spec.stage + 1}"
                raise ProtocolError(
                    Code.TOO_LARGE,
                    f"the {size}-byte message for {where} exceeds limits.max_message_bytes = "
                    f"{self.limits.max_message_bytes}",
                )
            self.out.send_multipart(sent, copy=False)
        except ProtocolError as e:
            e.ref = batch  # refused while running: `_refused` reports the batch it names
            raise
        except Exception as e:
            # a failed collective leaves the group unusable: report, then let the supervisor
            # restart us (SystemExit passes `drain`, which survives only a handler's bugs)
            log.exception("worker %d: batch %s failed", self.spec.rank, batch)
            self.tell(
                Kind.FAILED,
                batch=batch,
                stage=self.spec.stage,
                code=str(Code.WORKER_FAILED),
                message=f"{type(e).__name__}: {e}",
                fatal=True,
            )
            raise SystemExit(1) from e

    def _refused(self, _peer: Peer, e: ProtocolError) -> None:
        """A batch refused by decode (its header's ref names it, when readable) or by `step`."""
        batch = -1 if e.ref is None else e.ref
        log.warning("worker %d: refused batch %s: %s %s", self.spec.rank, batch, e.code, e.message)
        self.tell(
            Kind.FAILED,
            batch=batch,
            stage=self.spec.stage,
            code=str(e.code),
            message=e.message,
            fatal=False,
        )

    def close(self) -> None:
        if hasattr(self, "tp"):
            close(self.tp)
        self.ctx.destroy(linger=0)


# glibc's malloc: M_MMAP_THRESHOLD and M_TRIM_THRESHOLD (mallopt's parameter numbers)
_MMAP_THRESHOLD, _TRIM_THRESHOLD = -3, -1


def keep_freed_memory() -> None:
    """Have glibc keep freed blocks for reuse instead of returning them to the kernel. By default
    a block over 32 MB is mapped on allocation and unmapped on free, so a tensor of that size made
    every step (the LM head's logits: 300 rows x 50,257 floats, 60 MB) is page-faulted in afresh
    each time: the float32 LM head of GPT-2 for 300 rows took 54 ms that way and 34 ms with
    this. A worker's memory then stays at its peak, which its next batch reuses. No-op where the
    C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_TRIM_THRESHOLD, 1 << 31)
    except (OSError, AttributeError):
        log.info("not glibc: freed memory goes back to the kernel as the C library decides")


# oneDNN compiles a matmul for each row count it meets and keeps the last 1,024 in a cache. A
# worker meets many: a generation step's rows are its sequences plus its prefill tokens, each
# of 4 to 6 weight shapes, twice over where pooled layers (plain layout) sit beside private ones
# (packed). Past 1,024 the cache evicts and recompiles (0.2-1.6 ms a matmul): with half of
# GPT-2 8 x 512 pooled, 0.93 of all-private throughput at the default, 0.96 with this. A
# compiled matmul is about 15 KB.
PRIMITIVES = 8192


def cache_matmuls() -> None:
    """Before the first oneDNN call, which reads it: unless the environment already says."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(PRIMITIVES))


def release_freed_memory() -> None:
    """Hand back what loading freed (each weight's plain copy, once packed): kept, it would sit in
    the worker's private memory beside the packed weights for good. No-op where not glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller decides when we stop
    spec = Spec(**json.loads(argv[0]))
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s worker{spec.rank} %(levelname)s %(message)s"
    )
    keep_freed_memory()
    cache_matmuls()
    worker = Worker(spec)
    try:
        worker.start()
        worker.run()
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
