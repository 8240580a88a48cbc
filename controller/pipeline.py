"""Drives micro-batches through the stages without waiting for one to leave before the next.

Stage 0 is fed over one PUSH per TP rank (each rank needs the same tokens); the last stage's rank 0
pushes pooled outputs back to one PULL here. Up to `max_inflight` batches are inside at once,
except that a suspect batch (its job was inside when a worker died) travels alone: it enters an
empty pipeline and nothing follows it until it is out, so a job that kills workers takes no
neighbour's attempt with it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass

import torch
import zmq
import zmq.asyncio

from broker.protocol import Kind, Limits, ProtocolError, decode, encode
from broker.transport import configure
from controller.scheduler import Item
from workers.packing import pack

log = logging.getLogger("baton.pipeline")


@dataclass(slots=True)
class Flight:
    """A micro-batch inside the pipeline."""

    id: int
    items: list[Item]


class Pipeline:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        stage0: list[str],
        results: str,
        limits: Limits,
        max_inflight: int,
        padded: bool = False,
    ) -> None:
        self.limits, self.padded = limits, padded
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

    def may_send(self, items: list[Item]) -> bool:
        """False while a suspect must travel alone; then wait for `empty`."""
        if not self.inflight:
            return True
        return not items[0].attempts and not any(
            f.items[0].attempts for f in self.inflight.values()
        )

    async def reserve(self) -> None:
        """Wait for room for one more batch; the caller then forms it and calls `send`."""
        await self.slots.acquire()

    async def send(self, items: list[Item]) -> Flight:
        """Hand the packed batch to every stage-0 rank (after `reserve`, once `may_send`)."""
        flight = Flight(next(self.ids), items)
        task = items[0].task
        if task == "echo":  # routed through every stage like any batch, but nothing to compute
            frames = encode(Kind.BATCH, {"batch": flight.id, "task": task, "seq_lens": []})
        else:
            ids, seq_lens = pack([i.ids for i in items])
            body = {"batch": flight.id, "task": task, "seq_lens": seq_lens, "padded": self.padded}
            frames = encode(Kind.BATCH, body, [ids])
            self.tokens += len(ids)
            self.padded_tokens += len(seq_lens) * max(seq_lens)
        self.batches += 1
        self.inflight[flight.id] = flight
        self.empty.clear()
        for sock in self.feeds:
            await sock.send_multipart(frames, copy=False)
        return flight

    async def recv(self) -> tuple[Flight, torch.Tensor | None] | None:
        """The next finished batch and its embeddings (None for echo); None for a stale batch id
        or an unreadable message (its batch then stays inside until a restart takes it back)."""
        try:
            msg = decode(await self.out.recv_multipart(), self.limits, (Kind.OUTPUT,))
        except ProtocolError as e:
            log.error("unreadable output from the last stage: %s", e)
            return None
        flight = self.inflight.pop(msg.body.get("batch"), None)
        if flight is None:
            return None
        if not self.inflight:
            self.empty.set()
        self.slots.release()
        return flight, (msg.tensors[0] if msg.tensors else None)

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
