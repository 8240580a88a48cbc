"""Queue time (vLLM's `request_queue_time_seconds`): the broker's wait from acceptance to
dispatch plus the controller's `queued_s` (its wait until it first scheduled the job), counted
once per job into a histogram in the broker's status, which `/metrics` exports. Here: the
histogram, its export read by prometheus-client's own parser, and a real broker taking the
figure from a scripted controller's results. Through real fleets: tests/test_gateway.py (embed)
and tests/test_gateway_generate.py (generate)."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families
from test_generation_wire import WAIT_S, Ctl, RawClient, start, stop

from broker.buckets import Buckets, seconds
from broker.metrics import Metrics
from wire.protocol import Kind

NAME = "baton:request_queue_time_seconds"


def test_buckets_count_by_inclusive_upper_bound() -> None:
    b = Buckets((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 7.0):
        b.observe(v)
    assert b.state() == {"le": [1.0, 2.0], "buckets": [2, 3], "count": 4, "sum": 10.0}
    assert [seconds(v) for v in (0, 0.25, 3)] == [0.0, 0.25, 3.0]
    assert [seconds(v) for v in (-0.1, math.nan, math.inf, True, "1", None)] == [None] * 6


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_export_the_brokers_histogram() -> None:
    b = Buckets((0.3, 0.5))
    for v in (0.1, 0.4, 9.0):
        b.observe(v)
    body, _ = Metrics().render({"queue_time": b.state()})
    got = samples(body.decode())
    assert got[f"{NAME}_bucket", (("le", "0.3"),)] == 1
    assert got[f"{NAME}_bucket", (("le", "0.5"),)] == 2
    assert got[f"{NAME}_bucket", (("le", "+Inf"),)] == got[f"{NAME}_count", ()] == 3
    assert math.isclose(got[f"{NAME}_sum", ()], 9.5)
    # a broker that reports none yet: an empty histogram, not a missing one
    empty = samples(Metrics().render({})[0].decode())
    assert empty[f"{NAME}_count", ()] == 0 and empty[f"{NAME}_sum", ()] == 0


async def test_the_broker_counts_each_jobs_queue_time_once(tmp_path: Path) -> None:
    ctx = zmq.asyncio.Context()
    broker, journal, running = await start(tmp_path, ctx)
    ctl, client = Ctl(ctx, broker.backend), RawClient(ctx, broker.endpoint)
    try:
        await ctl.ready()
        await asyncio.wait_for(broker.registered.wait(), WAIT_S)
        t0 = time.monotonic()
        ids = ["q1", "q2", "q3"]
        await client.submit(*({"id": i, "task": "echo", "text": "x"} for i in ids))
        await ctl.take(3)
        ok = {"status": "ok", "tokens": 0, "truncated": False}
        entries = [
            {"id": "q1", **ok, "queued_s": 0.5},
            {"id": "q2", **ok, "queued_s": 0.25},
            {"id": "q3", **ok, "queued_s": "soon"},  # not a duration: the job is not counted
            {"id": "q1", **ok, "queued_s": 0.5},  # a duplicate: dropped, not counted again
        ]
        await ctl.say(Kind.RESULTS, results=entries, stats={})
        got = (await client.hear(Kind.RESULTS)).body["results"]
        elapsed = time.monotonic() - t0
        assert sorted(e["id"] for e in got) == ids
        assert not any("queued_s" in e for e in got)  # the broker's figure, not the client's
        state = broker.status()["queue_time"]
        assert state["count"] == 2
        # the controller's 0.75 s plus the broker's own wait, which the test's time bounds
        assert 0.75 <= state["sum"] <= 0.75 + 2 * elapsed
        # the stored result comes back without it too, and counts nothing again
        await client.submit({"id": "q1", "task": "echo", "text": "x"})
        [again] = (await client.hear(Kind.RESULTS)).body["results"]
        assert again == {"id": "q1", **ok}
        assert broker.status()["queue_time"]["count"] == 2
    finally:
        ctl.close()
        client.sock.close(0)
        await stop(broker, journal, running)
        ctx.destroy(0)
