"""Nothing stays stuck: a controller or broker paused past the silence timeout rejoins by itself,
and a backlog of long texts crosses a controller restart in messages within the limit."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable

import torch
from conftest import start
from corpus import reference

from baton.client import Client, Result
from baton.launch import Fleet

WAIT_S = 240
# short timeouts, so that a pause "longer than the timeout" is a few seconds
FAST = ("workers.heartbeat_ms=300", "workers.dead_after_ms=2000")
TEXTS = [f"a sentence about liveness, number {i}, and what it means" for i in range(20)]


async def until(probe: Callable[[], Awaitable[bool]], bound_s: float = 60) -> None:
    """Poll an outside process's state (there is no event to await) until it holds, bounded."""
    deadline = time.monotonic() + bound_s
    while not await probe():
        assert time.monotonic() < deadline, f"condition not reached within {bound_s} s"
        await asyncio.sleep(0.1)  # polling period of another process's state


def check(results: list[Result], texts: list[str]) -> None:
    bad = [(r.id, r.error) for r in results if not r.ok]
    assert not bad, bad[:5]
    got = torch.tensor([r.embedding for r in results])
    assert torch.nn.functional.cosine_similarity(got, reference(texts), dim=1).min() >= 0.9999


async def serve_after(fleet: Fleet, strike: Callable[[Client], Awaitable[None]]) -> dict:
    """Jobs in flight across the strike all end ok; then new jobs run on the same fleet."""
    async with Client(fleet.endpoint, timeout_s=WAIT_S) as client:
        before = await client.submit(
            {"id": f"before-{i}", "task": "embed", "text": t} for i, t in enumerate(TEXTS)
        )
        await strike(client)
        await asyncio.wait_for(asyncio.gather(*before), WAIT_S)
        check([f.result() for f in before], TEXTS)
        after = await client.submit(
            {"id": f"after-{i}", "task": "embed", "text": t} for i, t in enumerate(TEXTS)
        )
        await asyncio.wait_for(asyncio.gather(*after), WAIT_S)
        check([f.result() for f in after], TEXTS)
        return await client.status()


def test_a_controller_paused_past_the_timeout_rejoins() -> None:
    fleet = start(*FAST)
    try:

        async def strike(client: Client) -> None:
            [ctrl] = (await client.status())["controllers"]
            os.kill(ctrl["pid"], signal.SIGSTOP)
            try:

                async def dropped() -> bool:
                    return not (await client.status())["controllers"]

                await until(dropped)  # the broker has given up on it and requeued its jobs
            finally:
                os.kill(ctrl["pid"], signal.SIGCONT)

        status = asyncio.run(serve_after(fleet, strike))
        [ctrl] = status["controllers"]
        assert ctrl["epoch"] >= 2  # the same process, registered again
        # late results of the expired lease were taken once or dropped, never twice
        assert status["jobs"]["done"] == 2 * len(TEXTS)
    finally:
        fleet.stop()


def test_a_broker_paused_past_the_timeout_keeps_its_controllers() -> None:
    fleet = start(*FAST)
    try:

        async def strike(client: Client) -> None:
            os.kill(fleet.proc.pid, signal.SIGSTOP)
            try:
                # the pause itself is the fault: longer than the controllers' silence timeout
                await asyncio.sleep(3.0)
            finally:
                os.kill(fleet.proc.pid, signal.SIGCONT)

        status = asyncio.run(serve_after(fleet, strike))
        assert len(status["controllers"]) == 1
        assert status["jobs"]["done"] == 2 * len(TEXTS)
    finally:
        fleet.stop()


def test_a_backlog_of_long_texts_crosses_a_controller_restart() -> None:
    """3,000 accepted jobs of 12,000 characters (36 MB) waiting when the controller is killed:
    its successor is handed them in messages within the 16 MiB limit, and all are answered."""
    fleet = start("pipeline.max_inflight=2")
    try:
        long = [("word " * 2400)[: 12_000 - 8] + f"{i:08d}" for i in range(3000)]
        jobs = [{"id": f"long-{i}", "task": "echo", "text": t} for i, t in enumerate(long)]
        probes = TEXTS[:4]
        jobs += [{"id": f"probe-{i}", "task": "embed", "text": t} for i, t in enumerate(probes)]

        async def go() -> tuple[list[Result], dict]:
            async with Client(fleet.endpoint, timeout_s=WAIT_S) as client:
                [ctrl] = (await client.status())["controllers"]
                futures = await client.submit(jobs)  # all accepted (journaled) once this returns
                os.kill(ctrl["pid"], signal.SIGKILL)
                await asyncio.wait_for(asyncio.gather(*futures), WAIT_S)
                return [f.result() for f in futures], await client.status()

        results, status = asyncio.run(go())
        bad = [(r.id, r.error) for r in results if not r.ok]
        assert not bad, bad[:5]
        check(results[-len(probes) :], probes)
        assert status["jobs"]["running"] == 0 and status["jobs"]["queued"] == 0
    finally:
        fleet.stop()
