"""The broker <-> controller link, against a real Broker in this process and a scripted controller
on a real DEALER: registration again after a dropped lease, credit in jobs and bytes, `jobs`
messages cut to the limit, and the refusals each side sends the other."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from broker.broker import Broker
from broker.jobs import Job
from broker.journal import Journal
from wire.protocol import CONTROLLER_KINDS, Kind, Limits, Message, decode, encode, job_size
from wire.transport import Heartbeat

LIMITS = Limits(max_message_bytes=64_000)
WAIT_S = 30


class Ctl:
    """A scripted controller: a DEALER on the broker's controller endpoint."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, name: bytes = b"c1") -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, name)
        self.sock.linger = 0
        self.sock.connect(endpoint)

    async def say(self, kind: str, **body: object) -> None:
        await self.sock.send_multipart(encode(kind, body))

    async def hear(self, kind: str) -> Message:
        """The next message of this kind (heartbeats in between are skipped)."""
        while True:
            frames = await asyncio.wait_for(self.sock.recv_multipart(), WAIT_S)
            msg = decode(frames, Limits(max_message_bytes=1 << 26))
            if msg.kind == kind:
                return msg
            assert msg.kind == Kind.HEARTBEAT, msg

    async def ready(self, epoch: int = 1) -> None:
        await self.say(
            Kind.READY, model="m", tasks=["echo"], layout={}, workers=[], pid=1, epoch=epoch
        )


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[tuple[Broker, zmq.asyncio.Context]]:
    ctx = zmq.asyncio.Context()
    journal = Journal(str(tmp_path / "j.sqlite3"), "off")
    broker = Broker(
        ctx,
        "tcp://127.0.0.1:*",
        journal,
        LIMITS,
        backend_endpoint=f"ipc://{tmp_path}/broker",
        heartbeat=Heartbeat(0.05, 60),
    )
    running = asyncio.create_task(broker.run())
    try:
        yield broker, ctx
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        broker.close()
        await journal.close()
        ctx.destroy(0)


def queue(broker: Broker, n: int, text: str = "t") -> list[Job]:
    jobs = [Job(f"j{i}", "echo", text, "m") for i in range(n)]
    broker.table.add(jobs)
    return jobs


async def test_an_unknown_controller_is_told_to_register_again(fleet) -> None:
    broker, ctx = fleet
    ctl = Ctl(ctx, broker.backend)
    await ctl.say(Kind.CREDIT, n=10, bytes=1000, epoch=3)
    refusal = await ctl.hear(Kind.ERROR)
    assert refusal.body["code"] == "unknown_peer" and refusal.body["epoch"] == 3
    await ctl.ready(epoch=4)
    queue(broker, 2)
    await ctl.say(Kind.CREDIT, n=10, bytes=1000, epoch=4)
    assert [j["id"] for j in (await ctl.hear(Kind.JOBS)).body["jobs"]] == ["j0", "j1"]
    assert broker.status()["controllers"][0]["epoch"] == 4


async def test_jobs_are_cut_to_the_message_limit_and_the_byte_credit(fleet) -> None:
    broker, ctx = fleet
    ctl = Ctl(ctx, broker.backend)
    await ctl.ready()
    text = "x" * 10_000
    queue(broker, 30, text)
    size = job_size("j0", text)
    await ctl.say(Kind.CREDIT, n=1000, bytes=12 * size, epoch=1)
    got = []
    while len(got) < 12:
        msg = await ctl.hear(Kind.JOBS)
        assert len(encode(Kind.JOBS, msg.body)[0]) <= LIMITS.max_message_bytes
        got += msg.body["jobs"]
    assert len(got) == 12  # the byte credit, not the job credit, bounded it
    assert broker.table.running == 12 and broker.table.queued == 18


async def test_a_jobs_message_the_controller_refuses_goes_back_to_the_queue(fleet) -> None:
    broker, ctx = fleet
    ctl = Ctl(ctx, broker.backend)
    await ctl.ready()
    queue(broker, 3)
    await ctl.say(Kind.CREDIT, n=3, bytes=10_000, epoch=1)
    sent = await ctl.hear(Kind.JOBS)
    await ctl.say(Kind.ERROR, code="too_large", message="no", ref=sent.body["ref"], epoch=1)
    await ctl.say(Kind.CREDIT, n=3, bytes=10_000, epoch=1)
    again = await ctl.hear(Kind.JOBS)
    assert [j["id"] for j in again.body["jobs"]] == [j["id"] for j in sent.body["jobs"]]
    assert all(j["attempts"] == 1 for j in again.body["jobs"])


async def test_a_controller_message_past_the_limit_ends_its_lease(fleet) -> None:
    broker, ctx = fleet
    ctl = Ctl(ctx, broker.backend)
    await ctl.ready()
    queue(broker, 2)
    await ctl.say(Kind.CREDIT, n=2, bytes=10_000, epoch=1)
    await ctl.hear(Kind.JOBS)
    # results the broker cannot read: the two frames together are over the limit
    head = encode(Kind.RESULTS, {"results": []})[0]
    await ctl.sock.send_multipart([head, b"\0" * 40_000, b"\0" * 40_000])
    await ctl.say(Kind.REPORT, workers=[], state="ready", epoch=1)
    assert (await ctl.hear(Kind.ERROR)).body["code"] == "unknown_peer"
    assert broker.table.queued == 2 and broker.table.running == 0


def test_controller_kinds_include_its_refusals() -> None:
    assert Kind.ERROR in CONTROLLER_KINDS


async def test_the_urgent_lane_sends_priority_0_jobs_past_the_credit_one_at_a_time(fleet) -> None:
    broker, ctx = fleet
    ctl = Ctl(ctx, broker.backend)
    await ctl.ready()
    broker.table.add([Job(f"b{i}", "echo", "t", "m", priority=1) for i in range(3)])
    await ctl.say(Kind.CREDIT, n=0, bytes=0, urgent=1, epoch=1)  # no credit: nothing is sent
    broker.table.add([Job(f"i{i}", "echo", "t", "m") for i in range(2)])
    broker._dispatch()  # what a submit does after queueing
    first = await ctl.hear(Kind.JOBS)
    assert first.body["urgent"] is True and [j["id"] for j in first.body["jobs"]] == ["i0"]
    await ctl.say(Kind.CREDIT, n=0, bytes=0, urgent=1, epoch=1)  # open again: the next one
    second = await ctl.hear(Kind.JOBS)
    assert [j["id"] for j in second.body["jobs"]] == ["i1"]
    assert broker.table.queued == 3  # the batch jobs wait for credit
    await ctl.say(Kind.CREDIT, n=0, bytes=0, urgent=99, epoch=1)  # past the bound: refused
    await ctl.say(Kind.CREDIT, n=1, bytes=1000, epoch=1)
    assert [j["id"] for j in (await ctl.hear(Kind.JOBS)).body["jobs"]] == ["b0"]
    assert [c.urgent for c in broker.controllers.values()] == [0]
