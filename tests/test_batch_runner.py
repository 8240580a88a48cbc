"""The Batch API's runner (broker/batches.py) against a real Broker in this process and a scripted
decoder controller on a real DEALER (tests/test_generation_wire.py's), so that what the
controller does and when is the test's to say: a batch expiring at its deadline and when resumed
past it (the jobs still at the broker cancelled), lines sent while no model is served waiting
for one on the broker's hint, and a streamed line whose job an earlier run cancelled at its stop
string run again under a fresh id."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq.asyncio
from test_generation_wire import WAIT_S, Ctl, ctx, start, stop  # noqa: F401 (ctx: a fixture)

from baton.client import Client
from broker.batch_store import Batch, Store, new_id
from broker.batches import Batches
from broker.broker import Broker
from broker.texts import Texts
from wire.protocol import Code, Kind

DAY_S = 24 * 3600


@pytest.fixture
async def broker(tmp_path: Path, ctx: zmq.asyncio.Context) -> AsyncIterator[Broker]:  # noqa: F811
    broker, journal, running = await start(tmp_path, ctx)
    try:
        yield broker
    finally:
        await stop(broker, journal, running)


@pytest.fixture
async def client(broker: Broker) -> AsyncIterator[Client]:
    # as the gateway's: a busy refusal is the job's result, the runner retries it
    async with Client(broker.endpoint, timeout_s=WAIT_S, busy_attempts=0) as c:
        yield c


def line(custom_id: str, **body: object) -> dict:
    body = {"model": "gpt", "prompt": "hello", "max_tokens": 4, **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}


def create(store: Store, batches: Batches, rows: list[dict], created_at: int) -> Batch:
    """A batch of these lines, launched on `batches`, as POST /v1/batches makes one."""
    file_id = new_id("file-")
    store.path(file_id).write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows))
    store.add_file({"id": file_id, "object": "file", "purpose": "batch", "bytes": 0})
    batch = Batch(
        new_id("batch_"),
        file_id,
        "/v1/completions",
        "24h",
        created_at,
        output_file=new_id("file-"),
        error_file=new_id("file-"),
    )
    store.save(batch)
    batches.launch(batch)
    return batch


async def over(batches: Batches, batch: Batch) -> Batch:
    """The batch once its runner has ended (awaited, bounded)."""
    task = batches.tasks.get(batch.id)
    if task is not None:
        await asyncio.wait_for(asyncio.shield(task), WAIT_S)
    got = batches.store.batch(batch.id)
    assert got is not None
    return got


def rows(store: Store, file_id: str) -> list[dict]:
    path = store.path(file_id)
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


async def until(what: str, ok: object) -> None:
    """Poll a state of this process (bounded): the runner's progress has no event to await."""
    deadline = time.monotonic() + WAIT_S
    while not ok():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def runner(
    tmp_path: Path,
    ctx: zmq.asyncio.Context,  # noqa: F811 (the fixture's value, passed on)
    broker: Broker,
    client: Client,
    **kw: float,
) -> AsyncIterator[tuple[Store, Batches, Ctl]]:
    """A batch runner (a window of 8 lines) and the scripted controller, both closed after."""
    store = Store(tmp_path / "batches")
    batches = Batches(store, client, Texts(None, None), window=8, **kw)
    ctl = Ctl(ctx, broker.backend)
    try:
        yield store, batches, ctl
    finally:
        ctl.close()
        await batches.close()


async def test_a_batch_expires_at_its_deadline(tmp_path: Path, ctx, broker, client) -> None:  # noqa: F811
    # the deadline only has to outlast a few messages in this process (with room for a busy CI)
    async with runner(tmp_path, ctx, broker, client, window_s=8.0) as (store, batches, ctl):
        await ctl.ready()
        batch = create(store, batches, [line(f"l-{i}") for i in range(5)], int(time.time()))
        jobs = await ctl.take(3)  # two finish, one is left running, two stay queued
        assert [j["id"] for j in jobs] == [f"{batch.id}:{i}:0" for i in range(3)]
        for j in jobs[:2]:
            await ctl.finish(j["id"], [1, 2, 3, 4])
        cancel = await ctl.hear(Kind.CANCEL)  # the deadline: the running job is cancelled
        assert cancel.body["ids"] == [jobs[2]["id"]]
        done = await over(batches, batch)
    assert done.status == "expired" and done.expires_at == done.created_at + 8
    api = done.api()
    assert api["expired_at"] and api["completed_at"] is None and api["output_file_id"]
    assert api["request_counts"] == {"total": 5, "completed": 2, "failed": 3}
    assert [r["custom_id"] for r in rows(store, done.output_file)] == ["l-0", "l-1"]
    expired = rows(store, done.error_file)
    assert [r["custom_id"] for r in expired] == ["l-2", "l-3", "l-4"]
    assert all(r["error"]["code"] == "batch_expired" and r["response"] is None for r in expired)
    states = {broker.table.get(f"{batch.id}:{i}:0").state.value for i in range(2, 5)}
    assert states == {"cancelled"} and broker.table.running == broker.table.queued == 0


async def test_a_batch_resumed_past_its_deadline_expires_at_once(
    tmp_path: Path,
    ctx,  # noqa: F811
    broker,
    client,
) -> None:
    store = Store(tmp_path / "batches")
    first = Batches(store, client, Texts(None, None), window=8, window_s=DAY_S)
    ctl = Ctl(ctx, broker.backend)
    try:
        await ctl.ready()
        # made an hour ago: within a day's window, past a half hour's
        ago = int(time.time()) - 3600
        batch = create(store, first, [line(f"r-{i}") for i in range(4)], ago)
        [running] = await ctl.take(1)
        await first.close()  # the gateway stops: its jobs stay at the broker
        second = Batches(Store(tmp_path / "batches"), client, Texts(None, None), 8, 1800.0)
        second.start()
        cancel = await ctl.hear(Kind.CANCEL)  # what the first run left running is cancelled
        assert cancel.body["ids"] == [running["id"]]
        done = await over(second, batch)
        await second.close()
    finally:
        ctl.close()
    assert done.status == "expired" and done.expires_at == ago + 1800
    assert rows(store, done.output_file) == []
    expired = rows(store, done.error_file)
    assert [r["custom_id"] for r in expired] == [f"r-{i}" for i in range(4)]
    assert {r["error"]["code"] for r in expired} == {"batch_expired"}
    assert broker.table.running == broker.table.queued == 0


async def test_lines_sent_before_a_model_is_served_wait_for_one(
    tmp_path: Path,
    ctx,  # noqa: F811
    broker,
    client,
) -> None:
    async with runner(tmp_path, ctx, broker, client) as (store, batches, ctl):
        batch = create(store, batches, [line(f"w-{i}") for i in range(3)], int(time.time()))
        await until("the batch never started", lambda: batch.status == "in_progress")
        # the runner's submit went first on this connection: it was refused as this one is,
        # with a hint that says "not now" because no model is served yet
        [probe] = await client.results(
            await client.submit([{"task": "generate", "model": "gpt", "text": "x"}])
        )
        assert probe.error["code"] == Code.UNKNOWN_MODEL and probe.error["retry_after_ms"] > 0
        await ctl.ready()
        for j in await ctl.take(3):
            await ctl.finish(j["id"], [5, 6])
        done = await over(batches, batch)
        # a model the fleet does not serve is refused for good once one is served
        job = {"task": "generate", "model": "other", "text": "x"}
        [wrong] = await client.results(await client.submit([job]))
        assert wrong.error["code"] == Code.UNKNOWN_MODEL and "retry_after_ms" not in wrong.error
    assert done.status == "completed"
    out = rows(store, done.output_file)
    assert [r["custom_id"] for r in out] == ["w-0", "w-1", "w-2"]
    assert all(r["response"]["status_code"] == 200 for r in out)


async def test_a_stop_line_cancelled_by_an_earlier_run_runs_again(
    tmp_path: Path,
    ctx,  # noqa: F811
    broker,
    client,
) -> None:
    async with runner(tmp_path, ctx, broker, client) as (store, batches, ctl):
        await ctl.ready()
        batch = create(store, batches, [line("s", stop=["zz"])], int(time.time()))
        [first] = await ctl.take(1)
        # as a killed run's stop string left it: the broker holds it as cancelled
        await client.cancel([first["id"]])
        await ctl.hear(Kind.CANCEL)
        [again] = await ctl.take(1)
        assert again["id"] == f"{batch.id}:0:0.1"
        await ctl.finish(again["id"], [1, 25, 25, 3])  # the text is "bzzd"
        done = await over(batches, batch)
    [out] = rows(store, done.output_file)
    choice = out["response"]["body"]["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("b", "stop")


async def test_a_line_cancelled_by_someone_else_is_answered_as_an_error(
    tmp_path: Path,
    ctx,  # noqa: F811
    broker,
    client,
) -> None:
    async with runner(tmp_path, ctx, broker, client) as (store, batches, ctl):
        await ctl.ready()
        batch = create(store, batches, [line("gone"), line("kept")], int(time.time()))
        first, second = await ctl.take(2)
        await client.cancel([first["id"]])  # not the batch's doing: an operator's, say
        await ctl.hear(Kind.CANCEL)
        await ctl.finish(second["id"], [1, 2])
        done = await over(batches, batch)
    assert done.status == "completed"
    assert done.api()["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    assert [r["custom_id"] for r in rows(store, done.output_file)] == ["kept"]
    [err] = rows(store, done.error_file)
    assert err["custom_id"] == "gone" and err["response"]["status_code"] != 200
