"""Generation at the broker, the journal and the client, with no model: generate jobs checked at
the door, their prompts and params journaled across a broker restart, `tokens` deltas forwarded
to their own job's clients only, and Client.generate_stream over a real Broker in this process
with a scripted controller on a real DEALER."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from baton.client import Client, Delta, Result
from broker import jobs as J
from broker import validation as V
from broker.broker import Broker
from broker.journal import Journal
from wire.limits import Limits
from wire.protocol import Code, Kind, Message, ProtocolError, decode, encode, job_size
from wire.transport import Heartbeat

WAIT_S = 30
GEN = V.Generation(vocab_size=100, max_positions=64, eos_token_id=0)
SERVED = {
    "gpt": V.Served(frozenset({"generate", "echo"}), GEN),
    "enc": V.Served(frozenset({"embed", "echo"})),
}
LIMITS = Limits(max_text_chars=1000)


def check(**job: Any) -> J.Job:
    return V.validate({"task": "generate", "model": "gpt", **job}, SERVED, "gpt", LIMITS)


# --- validation at the door ---


def test_a_generate_job_gets_every_default_and_goes_on_the_wire_as_tokens() -> None:
    job = check(id="g", token_ids=[1, 2, 3])
    assert job.params == {
        "max_new_tokens": 16,
        "temperature": 0.0,
        "top_k": 0,
        "top_p": 1.0,
        "ignore_eos": False,
        "stop_token_ids": [],
    }
    wire = job.wire()
    assert wire["token_ids"] == [1, 2, 3] and "text" not in wire and wire["params"] == job.params
    assert job.measure() >= len(msgpack.packb(wire))
    seeded = check(text="hi", seed=2**63 - 1, temperature=1, top_p=0.5, stop_token_ids=[9] * 64)
    assert seeded.wire()["text"] == "hi" and seeded.params["seed"] == 2**63 - 1
    assert seeded.params["temperature"] == 1.0  # a JSON integer is a number too
    assert seeded.measure() >= len(msgpack.packb(seeded.wire()))
    # the embed case costs what it did
    assert J.Job("e", "embed", "abc", "enc").measure() == job_size("e", "abc")


REFUSED = {
    "both prompts": (dict(text="a", token_ids=[1]), Code.BAD_FIELD),
    "no prompt": (dict(), Code.BAD_FIELD),
    "unknown field": (dict(text="a", beam_width=4), Code.BAD_FIELD),
    "token_ids not ints": (dict(token_ids=[1, "2"]), Code.BAD_FIELD),
    "token id a bool": (dict(token_ids=[True]), Code.BAD_FIELD),
    "max_new_tokens zero": (dict(text="a", max_new_tokens=0), Code.BAD_FIELD),
    "negative temperature": (dict(text="a", temperature=-0.1), Code.BAD_FIELD),
    "nan temperature": (dict(text="a", temperature=float("nan")), Code.BAD_FIELD),
    "top_p zero": (dict(text="a", top_p=0.0), Code.BAD_FIELD),
    "top_k negative": (dict(text="a", top_k=-1), Code.BAD_FIELD),
    "seed too large": (dict(text="a", seed=2**63), Code.BAD_FIELD),
    "ignore_eos not bool": (dict(text="a", ignore_eos=1), Code.BAD_FIELD),
    "too many stop ids": (dict(text="a", stop_token_ids=[1] * 65), Code.BAD_FIELD),
    "empty token_ids": (dict(token_ids=[]), Code.EMPTY_PROMPT),
    "blank text": (dict(text=" \n"), Code.EMPTY_PROMPT),
    "past the positions": (dict(token_ids=[1] * 60, max_new_tokens=5), Code.PROMPT_TOO_LONG),
    "text past the positions": (dict(text="a", max_new_tokens=64), Code.PROMPT_TOO_LONG),
    "over max_text_chars ids": (dict(token_ids=[1] * 1001), Code.PROMPT_TOO_LONG),
    "over max_text_chars text": (dict(text="a" * 1001), Code.PROMPT_TOO_LONG),
    "token past the vocabulary": (dict(token_ids=[1, 100]), Code.TOKEN_OUT_OF_RANGE),
    "negative token": (dict(token_ids=[-1]), Code.TOKEN_OUT_OF_RANGE),
    "stop id past the vocabulary": (dict(text="a", stop_token_ids=[100]), Code.TOKEN_OUT_OF_RANGE),
    "an encoder": (dict(text="a", model="enc"), Code.UNKNOWN_TASK),
}


@pytest.mark.parametrize("job, code", REFUSED.values(), ids=REFUSED.keys())
def test_a_bad_generate_job_is_refused_with_its_code(job: dict, code: Code) -> None:
    with pytest.raises(ProtocolError) as e:
        check(**job)
    assert e.value.code == code, e.value.message


def test_an_embed_job_takes_no_generate_fields_and_no_bounds_means_no_model_checks() -> None:
    with pytest.raises(ProtocolError) as e:
        V.validate({"task": "embed", "text": "a", "top_k": 3}, SERVED, "enc", LIMITS)
    assert e.value.code == Code.BAD_FIELD
    # a controller that gives no "generation" bounds: only what needs no model is checked
    bare = {"gpt": V.Served(frozenset({"generate"}))}
    raw = {"task": "generate", "token_ids": [10**6] * 10, "max_new_tokens": 10**6}
    assert V.validate(raw, bare, "gpt", LIMITS).token_ids == [10**6] * 10


def test_resubmitting_an_id_with_other_params_is_a_different_job() -> None:
    a, b = check(id="x", token_ids=[1, 2]), check(id="x", token_ids=[1, 2], top_k=5)
    assert J.same_job(a, check(id="x", token_ids=[1, 2])) and not J.same_job(a, b)
    long = check(id="y", token_ids=list(range(1, 60)), max_new_tokens=1)
    long.digest, long.token_ids = J.digest(long), None  # what a finished job keeps
    assert J.same_job(long, check(id="y", token_ids=list(range(1, 60)), max_new_tokens=1))
    assert not J.same_job(long, check(id="y", token_ids=list(range(1, 60)), max_new_tokens=2))


# --- a broker in this process, a scripted controller, raw and real clients ---


class Ctl:
    """A scripted decoder controller: a DEALER on the broker's controller endpoint."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, name: bytes = b"c1") -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, name)
        self.sock.linger = 0
        self.sock.connect(endpoint)

    async def say(self, kind: str, **body: object) -> None:
        await self.sock.send_multipart(encode(kind, {**body, "epoch": 1}))

    async def hear(self, kind: str) -> Message:
        while True:  # heartbeats in between are skipped
            msg = decode(await asyncio.wait_for(self.sock.recv_multipart(), WAIT_S), Limits())
            if msg.kind == kind:
                return msg
            assert msg.kind == Kind.HEARTBEAT, msg

    async def ready(self) -> None:
        await self.say(
            Kind.READY,
            model="gpt",
            tasks=["generate", "echo"],
            layout={},
            workers=[],
            pid=1,
            generation={"vocab_size": 100, "max_positions": 64, "eos_token_id": 0},
        )

    async def take(self, n: int) -> list[dict]:
        """Ask for n jobs and wait until they all came."""
        await self.say(Kind.CREDIT, n=n, bytes=1 << 20)
        got: list[dict] = []
        while len(got) < n:
            got += (await self.hear(Kind.JOBS)).body["jobs"]
        return got

    async def deltas(self, *deltas: tuple[str, int, list[int]]) -> None:
        await self.say(
            Kind.TOKENS, deltas=[{"id": i, "index": k, "token_ids": t} for i, k, t in deltas]
        )

    async def finish(self, jid: str, token_ids: list[int], prompt_tokens: int = 3) -> None:
        entry = {
            "id": jid,
            "status": "ok",
            "token_ids": token_ids,
            "text": "".join(chr(97 + t % 26) for t in token_ids),
            "finish_reason": "length",
            "prompt_tokens": prompt_tokens,
        }
        await self.say(Kind.RESULTS, results=[entry], stats={})

    def close(self) -> None:
        self.sock.close(0)


class RawClient:
    """A client DEALER that speaks the protocol by hand."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)

    async def submit(self, *jobs: dict) -> list[str]:
        await self.sock.send_multipart(encode(Kind.SUBMIT, {"jobs": list(jobs), "ref": 1}))
        return (await self.hear(Kind.ACCEPTED)).body["ids"]

    async def hear(self, kind: str) -> Message:
        msg = decode(await asyncio.wait_for(self.sock.recv_multipart(), WAIT_S), Limits())
        assert msg.kind == kind, msg
        return msg


async def start(tmp_path: Path, ctx: zmq.asyncio.Context) -> tuple[Broker, Journal, asyncio.Task]:
    journal = Journal(str(tmp_path / "j.sqlite3"), "batch")
    broker = Broker(
        ctx,
        "tcp://127.0.0.1:*",
        journal,
        backend_endpoint=f"ipc://{tmp_path}/broker",
        heartbeat=Heartbeat(0.05, 60),
    )
    return broker, journal, asyncio.create_task(broker.run())


async def stop(broker: Broker, journal: Journal, running: asyncio.Task) -> None:
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    broker.close()
    await journal.close()


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(0)


@pytest.fixture
async def fleet(tmp_path: Path, ctx: zmq.asyncio.Context) -> AsyncIterator[tuple[Broker, Ctl]]:
    broker, journal, running = await start(tmp_path, ctx)
    ctl = Ctl(ctx, broker.backend)
    try:
        await ctl.ready()
        await asyncio.wait_for(broker.registered.wait(), WAIT_S)
        yield broker, ctl
    finally:
        ctl.close()
        await stop(broker, journal, running)


async def test_params_and_prompt_tokens_survive_a_broker_restart(tmp_path: Path, ctx) -> None:
    broker, journal, running = await start(tmp_path, ctx)
    ctl, client = Ctl(ctx, broker.backend), RawClient(ctx, broker.endpoint)
    try:
        await ctl.ready()
        await asyncio.wait_for(broker.registered.wait(), WAIT_S)
        job = {"id": "g1", "task": "generate", "token_ids": [5, 6, 7], "seed": 3, "top_k": 4}
        done = {"id": "g2", "task": "generate", "text": "hello", "max_new_tokens": 2}
        assert await client.submit(job, done) == ["g1", "g2"]
        sent = {j["id"]: j for j in await ctl.take(2)}
        await ctl.finish("g2", [1, 2])
        await client.hear(Kind.RESULTS)  # g2's end is journaled before it is delivered
    finally:
        ctl.close()
        client.sock.close(0)
        await stop(broker, journal, running)
    broker, journal, running = await start(tmp_path, ctx)  # the same journal: g1 runs again
    ctl, client = Ctl(ctx, broker.backend), RawClient(ctx, broker.endpoint)
    try:
        await ctl.ready()
        [again] = await ctl.take(1)
        assert again["token_ids"] == [5, 6, 7] and "text" not in again
        assert again["params"] == sent["g1"]["params"]
        assert again["params"]["seed"] == 3 and again["params"]["top_k"] == 4
        # g2's final entry was journaled: resubmitting its id hands it back without a run
        await client.submit(done)
        [entry] = (await client.hear(Kind.RESULTS)).body["results"]
        assert entry["token_ids"] == [1, 2] and entry["finish_reason"] == "length"
    finally:
        ctl.close()
        client.sock.close(0)
        await stop(broker, journal, running)


async def test_deltas_go_only_to_their_jobs_clients(fleet, ctx) -> None:
    broker, ctl = fleet
    alice, bob = RawClient(ctx, broker.endpoint), RawClient(ctx, broker.endpoint)
    other = Ctl(ctx, broker.backend, b"c2")
    try:
        await alice.submit({"id": "a", "task": "generate", "token_ids": [1]})
        await bob.submit({"id": "b", "task": "generate", "token_ids": [2]})
        await ctl.take(2)
        await other.ready()  # a second controller: it holds no lease on a or b
        await other.deltas(("a", 0, [66]), ("b", 0, [66]))
        await ctl.deltas(("a", 0, [10]), ("b", 0, [20]), ("nobody", 0, [1]))
        await ctl.deltas(("a", 1, [11]))
        got_a = [(await alice.hear(Kind.TOKENS)).body["deltas"] for _ in range(2)]
        got_b = (await bob.hear(Kind.TOKENS)).body["deltas"]
        assert got_a == [
            [{"id": "a", "index": 0, "token_ids": [10]}],
            [{"id": "a", "index": 1, "token_ids": [11]}],
        ]
        assert got_b == [{"id": "b", "index": 0, "token_ids": [20]}]
        await ctl.finish("b", [20, 21])
        [entry] = (await bob.hear(Kind.RESULTS)).body["results"]  # nothing else came first
        assert entry["id"] == "b" and entry["token_ids"] == [20, 21]
    finally:
        other.close()
        alice.sock.close(0)
        bob.sock.close(0)


async def test_generate_stream_yields_in_order_drops_repeats_and_ends_with_the_result(
    fleet,
) -> None:
    broker, ctl = fleet
    async with Client(broker.endpoint, timeout_s=WAIT_S) as client:
        stream = client.generate_stream([1, 2, 3], id="s", max_new_tokens=5)
        first = asyncio.ensure_future(anext(stream))  # submits, then waits for a delta
        [job] = await ctl.take(1)
        assert job["params"]["max_new_tokens"] == 5
        await ctl.deltas(("s", 0, [5, 6]))
        await ctl.deltas(("s", 2, [7]), ("s", 0, [5, 6]))  # a repeat, as after a restart
        await ctl.deltas(("s", 2, [7, 8]))  # overlaps: only 8 is new
        await ctl.finish("s", [5, 6, 7, 8, 9])
        got: list[Delta] = [await asyncio.wait_for(first, WAIT_S)]
        async for delta in stream:
            got.append(delta)
    assert [(d.index, d.token_ids) for d in got] == [(0, [5, 6]), (2, [7]), (3, [8]), (4, [9])]
    assert [d.final for d in got] == [False, False, False, True]
    result = got[-1].result
    assert isinstance(result, Result) and result.ok and result.token_ids == [5, 6, 7, 8, 9]
    assert got[-1].finish_reason == "length" and result.prompt_tokens == 3
    assert result.to_json() == {
        "id": "s",
        "status": "ok",
        "token_ids": [5, 6, 7, 8, 9],
        "text": "fghij",
        "finish_reason": "length",
        "prompt_tokens": 3,
    }


async def test_cancelling_a_streamed_job_ends_its_stream(fleet) -> None:
    broker, ctl = fleet
    async with Client(broker.endpoint, timeout_s=WAIT_S) as client:
        stream = client.generate_stream("once upon", id="c")
        first = asyncio.ensure_future(anext(stream))
        await ctl.take(1)
        await ctl.deltas(("c", 0, [4]))
        assert (await asyncio.wait_for(first, WAIT_S)).token_ids == [4]
        assert (await client.cancel(["c"]))["ids"] == ["c"]
        rest = [d async for d in stream]
    assert len(rest) == 1 and rest[0].final and rest[0].token_ids == []
    assert rest[0].result is not None and rest[0].result.error["code"] == "cancelled"


async def test_generate_returns_results_in_order_and_refusals_alone(fleet) -> None:
    broker, ctl = fleet
    async with Client(broker.endpoint, timeout_s=WAIT_S) as client:
        call = asyncio.ensure_future(client.generate([[1, 2], "hi", [500]], max_new_tokens=2))
        jobs = await ctl.take(2)
        for j in reversed(jobs):
            await ctl.finish(j["id"], [9, 9])
        got = await asyncio.wait_for(call, WAIT_S)
    assert [r.ok for r in got] == [True, True, False]
    assert got[0].token_ids == [9, 9] and got[2].error["code"] == "token_out_of_range"
