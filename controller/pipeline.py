"""Drives micro-batches through the stages without waiting for one to leave before the next.

Stage 0 is fed over one PUSH per TP rank (each rank needs the same tokens); the last stage's rank 0
pushes outputs back to one PULL here: pooled embeddings for an embed batch, one sampled token per
sampling sequence for a generate step. A generate step carries, besides its new tokens, where their
K/V go (`slot_mapping`) and each sequence's blocks (`block_tables`); every stage keeps its own
layers' K/V, and takes micro-batches in the order they were sent, so a step always sees the K/V
of the steps sent before it. Up to `max_inflight` batches are inside at once,
except that a suspect batch (its job was inside when a worker died) travels alone: it enters an
empty pipeline and nothing follows it until it is out, so a job that kills workers takes no
neighbour's attempt with it.

A batch a stage refuses (or whose output the controller cannot read) leaves through `take`, named
by its id: every message of a batch carries that id as its `ref`, which `decode` hands back even
with a refusal, so a refused batch can always be told apart from the rest.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import msgpack
import torch
import zmq
import zmq.asyncio

from controller.scheduler import MicroBatch
from wire.protocol import DTYPE_NAMES, VERSION, Kind, Limits, Message, ProtocolError, encode
from wire.transport import Peer, configure, serve
from workers.packing import pack

log = logging.getLogger("baton.pipeline")

# msgpack's widest unsigned int: no batch id of a live controller gets near it
MAX_BATCH_ID = 2**64 - 1


def batch_body(batch: int, task: str, seq_lens: list[int], padded: bool) -> dict[str, Any]:
    """The header fields of a batch; every stage forwards them, and the last adds nothing."""
    return {"batch": batch, "ref": batch, "task": task, "seq_lens": seq_lens, "padded": padded}


def encoded_size(
    kind: str, body: dict[str, Any], tensors: list[tuple[torch.dtype, list[int]]]
) -> int:
    """Bytes `encode(kind, body, tensors)` puts on the wire, without building the tensors (the
    largest batch's may not fit in memory twice): the header as encode writes it, plus the
    tensors' raw bytes."""
    header: dict[str, Any] = {"v": VERSION, "kind": str(kind), **body}
    if tensors:
        header["tensors"] = [{"dtype": DTYPE_NAMES[d], "shape": list(s)} for d, s in tensors]
    return len(msgpack.packb(header, use_bin_type=True)) + sum(
        math.prod(shape) * dtype.itemsize for dtype, shape in tensors
    )


@dataclass(slots=True, frozen=True)
class Hop:
    """The largest message a batch can put on one hop."""

    name: str  # e.g. "from stage 0 to stage 1"
    size: int  # bytes, header included
    payload: str  # what the tensor is, e.g. "float32 [4096, 384] activations"
    header: int  # bytes of the msgpack header

    def __str__(self) -> str:
        return f"{self.size} bytes {self.name} ({self.payload} and a {self.header}-byte header)"


def largest_messages(
    max_batch_tokens: int,
    max_seq_length: int,
    min_seq_length: int,
    hidden: int,
    dtype: torch.dtype,
    pipeline: int,
    generate: tuple[int, int] | None = None,
) -> list[Hop]:
    """The largest message a batch can put on each hop, largest first.

    Embed: the worst batch is the scheduler's: up to `max_batch_tokens` tokens, or one job alone
    of up to `max_seq_length`; as many sequences as fit at the shortest a text can tokenize to
    (the special tokens alone), which is also the longest `seq_lens` header. Between stages the
    activations are packed `[T, hidden]` in the model's dtype whether or not the batch is run
    padded (a stage unpads before it sends); the last stage sends float32 embeddings
    `[n, hidden]`, one per sequence.

    Generate (`generate` = (max_positions, block_size)): the worst step is `max_batch_tokens`
    decodes of one token each, every one sampling, every context at the model's last position:
    the longest header, and block tables of `max_positions / block_size` blocks a row.
    """
    if generate is not None:
        return _largest_generate(max_batch_tokens, hidden, dtype, pipeline, *generate)
    worst: list[list[int]] = []
    if max_batch_tokens >= min_seq_length:
        n = max_batch_tokens // min_seq_length
        # the remainder goes to one sequence, so the batch holds exactly max_batch_tokens
        last = min(max_seq_length, min_seq_length + max_batch_tokens - n * min_seq_length)
        worst.append([min_seq_length] * (n - 1) + [last])
    worst.append([max_seq_length])  # a job alone may exceed the budget
    best: dict[str, Hop] = {}
    for seq_lens in worst:
        tokens, n = sum(seq_lens), len(seq_lens)
        body = batch_body(MAX_BATCH_ID, "embed", seq_lens, False)
        hops = [("to stage 0", Kind.BATCH, torch.int64, [tokens], "token ids")]
        hops += [
            (f"from stage {s - 1} to stage {s}", Kind.BATCH, dtype, [tokens, hidden], "activations")
            for s in range(1, pipeline)
        ]
        hops.append(
            (
                f"from stage {pipeline - 1} to the controller",
                Kind.OUTPUT,
                torch.float32,
                [n, hidden],
                "embeddings",
            )
        )
        for hop, kind, dt, shape, what in hops:
            size = encoded_size(kind, body, [(dt, shape)])
            payload = math.prod(shape) * dt.itemsize
            if hop not in best or size > best[hop].size:
                best[hop] = Hop(hop, size, f"{DTYPE_NAMES[dt]} {shape} {what}", size - payload)
    return sorted(best.values(), key=lambda h: -h.size)


def _largest_generate(
    tokens: int, hidden: int, dtype: torch.dtype, pipeline: int, max_positions: int, block_size: int
) -> list[Hop]:
    n = tokens
    width = -(-max_positions // block_size)
    # the widest value msgpack can be handed in each field (floats are always 9 bytes)
    row = [n - 1, 1.0, 2**63 - 1, 1.0, 2**63 - 1, max_positions]
    body = generate_body(MAX_BATCH_ID, [1] * n, [max_positions] * n, [row] * n)
    rest = [(torch.int64, [tokens]), (torch.int32, [n, width])]  # slot_mapping, block_tables
    hops: list[Hop] = []
    for s in range(pipeline):
        name = "to stage 0" if s == 0 else f"from stage {s - 1} to stage {s}"
        x = (torch.int64, [tokens]) if s == 0 else (dtype, [tokens, hidden])
        what = "token ids" if s == 0 else "activations"
        size = encoded_size(Kind.BATCH, body, [x, *rest])
        payload = sum(math.prod(sh) * dt.itemsize for dt, sh in [x, *rest])
        desc = f"{DTYPE_NAMES[x[0]]} {x[1]} {what}, slot mapping, int32 [{n}, {width}] block tables"
        hops.append(Hop(name, size, desc, size - payload))
    out = {"batch": MAX_BATCH_ID, "ref": MAX_BATCH_ID, "token_ids": [2**32 - 1] * n}
    size = encoded_size(Kind.OUTPUT, out, [])
    hops.append(
        Hop(f"from stage {pipeline - 1} to the controller", size, "sampled token ids", size)
    )
    return sorted(hops, key=lambda h: -h.size)


def generate_body(
    batch: int, seq_lens: list[int], context_lens: list[int], sample: list[list[Any]]
) -> dict[str, Any]:
    """The header of a generate step (docs: the generation wire spec)."""
    return {
        "batch": batch,
        "ref": batch,
        "task": "generate",
        "seq_lens": seq_lens,
        "context_lens": context_lens,
        "sample": sample,
    }


def generate_message(batch_id: int, mb: MicroBatch, block_size: int) -> tuple[dict, list]:
    """The body and tensors of a generate step: each sequence's new tokens, where their K/V go
    (slot = block * block_size + offset), and the blocks it attends over."""
    # plain ints until the end: a few small tensor ops per sequence were ~2 ms of a 128-sequence
    # step, on the critical path between one decoding step and the next
    x: list[int] = []
    slots: list[int] = []
    context_lens: list[int] = []
    tables: list[list[int]] = []
    for seq, q in zip(mb.seqs, mb.seq_lens, strict=True):
        start, end = seq.num_cached_tokens, seq.num_cached_tokens + q
        x += seq.token_ids[start:end]
        table = seq.block_table
        slots += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
        context_lens.append(end)
        tables.append(table[: -(-end // block_size)])
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)
    sample = []
    for i in mb.sample:
        seq = mb.seqs[i]
        p = seq.params
        assert p is not None
        seed = -1 if p.seed is None else p.seed
        sample.append([i, p.temperature, p.top_k, p.top_p, seed, seq.num_completion_tokens])
    body = generate_body(batch_id, list(mb.seq_lens), context_lens, sample)
    return body, [
        torch.tensor(x, dtype=torch.int64),
        torch.tensor(slots, dtype=torch.int64),
        block_tables,
    ]


@dataclass(slots=True)
class Flight:
    """A micro-batch inside the pipeline."""

    id: int
    batch: MicroBatch


@dataclass(slots=True)
class Landed:
    """A micro-batch out of the last stage: embeddings (embed), sampled tokens (generate)."""

    flight: Flight
    emb: torch.Tensor | None = None
    token_ids: list[int] | None = None


class Pipeline:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        stage0: list[str],
        results: str,
        limits: Limits,
        max_inflight: int,
        padded: bool = False,
        block_size: int = 16,
    ) -> None:
        self.limits, self.padded, self.block_size = limits, padded, block_size
        self.ctx, self.stage0 = ctx, stage0
        self.feeds: list[zmq.asyncio.Socket] = []
        self.connect()
        self.out = ctx.socket(zmq.PULL)
        configure(self.out, limits)
        self.out.bind(results)
        self.inflight: dict[int, Flight] = {}
        self.empty = asyncio.Event()
        self.empty.set()
        self.slots = asyncio.Semaphore(max_inflight)
        self.ids = itertools.count()
        # a batch the controller could not read back: (batch id, code, message)
        self.on_refused: Callable[[dict[str, Any]], None] = lambda body: None
        # what went in: real tokens, and what padding each batch to its longest would have cost
        self.batches = self.tokens = self.padded_tokens = 0

    def connect(self) -> None:
        """Fresh feeds: a queue left over for dead workers must not reach their replacements,
        or the ranks of stage 0 would see different batches and their collectives would hang."""
        for sock in self.feeds:
            sock.close(0)
        self.feeds = []
        for ep in self.stage0:
            sock = self.ctx.socket(zmq.PUSH)
            configure(sock)
            sock.connect(ep)
            self.feeds.append(sock)

    def idle(self) -> bool:
        return not self.inflight

    def may_send(self, batch: MicroBatch) -> bool:
        """False while a suspect must travel alone; then wait for `empty`."""
        if not self.inflight:
            return True
        return not batch.suspect and not any(f.batch.suspect for f in self.inflight.values())

    async def reserve(self) -> None:
        """Wait for room for one more batch; the caller then forms it and calls `send`."""
        await self.slots.acquire()

    def unreserve(self) -> None:
        """Give back a reserved slot no batch was sent in."""
        self.slots.release()

    async def send(self, batch: MicroBatch) -> Flight | None:
        """Hand the batch to every stage-0 rank (after `reserve`, once `may_send`). None, and
        the slot given back, when every sequence of it was cancelled while it waited."""
        batch = batch.pruned()
        if not batch.seqs:
            self.unreserve()
            return None
        flight = Flight(next(self.ids), batch)
        task = batch.task
        if task == "echo":  # routed through every stage like any batch, but nothing to compute
            frames = encode(Kind.BATCH, batch_body(flight.id, task, [], self.padded))
        elif not batch.oneshot:
            body, tensors = generate_message(flight.id, batch, self.block_size)
            frames = encode(Kind.BATCH, body, tensors)
            self.tokens += len(tensors[0])
            self.padded_tokens += len(tensors[0])
        else:
            ids, seq_lens = pack([s.token_ids for s in batch.seqs])
            frames = encode(Kind.BATCH, batch_body(flight.id, task, seq_lens, self.padded), [ids])
            self.tokens += len(ids)
            self.padded_tokens += len(seq_lens) * max(seq_lens)
        self.batches += 1
        self.inflight[flight.id] = flight
        self.empty.clear()
        for sock in self.feeds:
            await sock.send_multipart(frames, copy=False)
        return flight

    async def collect(self, landed: Callable[[Landed], None]) -> NoReturn:
        """Take the last stage's outputs until cancelled (the wire's `serve`), each finished
        batch to `landed`, in arrival order. A stale batch id is dropped. An unreadable output
        whose header names its batch goes to `on_refused`, as a stage's refusal would; one that
        names none is only logged."""

        def output(_peer: Peer, msg: Message) -> None:
            got = self.land(msg)
            if got is not None:
                landed(got)

        await serve(self.out, self.limits, {Kind.OUTPUT: output}, refused=self._unreadable, log=log)

    def _unreadable(self, _peer: Peer, e: ProtocolError) -> None:
        log.error("unreadable output from the last stage: %s %s", e.code, e.message)
        if e.ref is not None:
            self.refused(e.ref, str(e.code), e.message)

    def land(self, msg: Message) -> Landed | None:
        """The batch an `output` message finishes, out of the pipeline; None for a stale batch
        id, or for sampled tokens that do not fit the step (refused, as unreadable)."""
        batch = msg.body.get("batch")
        known = isinstance(batch, int) and not isinstance(batch, bool)
        flight = self.inflight.get(batch) if known else None
        if flight is None:
            return None
        if flight.batch.oneshot:
            self.take(batch)
            return Landed(flight, emb=msg.tensors[0] if msg.tensors else None)
        token_ids = msg.body.get("token_ids")
        if not (
            isinstance(token_ids, list)
            and len(token_ids) == len(flight.batch.sample)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in token_ids)
        ):
            want = len(flight.batch.sample)
            self.refused(batch, "bad_field", f"output token_ids is not a list of {want} ints")
            return None
        self.take(batch)
        return Landed(flight, token_ids=token_ids)

    def refused(self, batch: Any, code: str, message: str) -> None:
        self.on_refused({"batch": batch, "code": code, "message": message, "stage": -1})

    def take(self, batch: Any) -> Flight | None:
        """Batch `batch` out of the pipeline (finished or refused), its slot free again; None if
        it is not inside (a stale id, or already taken: each TP rank reports its refusal)."""
        known = isinstance(batch, int) and not isinstance(batch, bool)
        flight = self.inflight.pop(batch, None) if known else None
        if flight is None:
            return None
        if not self.inflight:
            self.empty.set()
        self.slots.release()
        return flight

    def stats(self) -> dict[str, int]:
        return {"batches": self.batches, "tokens": self.tokens, "padded_tokens": self.padded_tokens}

    def abandon(self) -> list[Flight]:
        """Every batch inside, taken back (its workers died); the slots become free again."""
        lost = list(self.inflight.values())
        self.inflight.clear()
        self.empty.set()
        for _ in lost:
            self.slots.release()
        return lost

    def close(self) -> None:
        for sock in (*self.feeds, self.out):
            sock.close(0)
