"""Nothing accepted is lost: kill a worker, the controller, or all of `baton up`, mid-load."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from conftest import start
from corpus import reference, texts

from baton.client import Client, Result
from baton.launch import Fleet

N = 300
WAIT_S = 240


@lru_cache(maxsize=1)
def workload() -> tuple[list[dict], torch.Tensor]:
    chosen = [t for t in texts(N + 20, seed=3) if t.strip()][:N]
    jobs = [{"id": f"chaos-{i}", "task": "embed", "text": t} for i, t in enumerate(chosen)]
    return jobs, reference(chosen)


def check(results: list[Result]) -> None:
    """Every job ended ok, with the embedding sentence-transformers gives."""
    jobs, ref = workload()
    assert [r.id for r in results] == [j["id"] for j in jobs]
    bad = [(r.id, r.error) for r in results if r.status != "ok"]
    assert not bad, bad[:5]
    got = torch.tensor([r.embedding for r in results])
    assert torch.nn.functional.cosine_similarity(got, ref, dim=1).min() >= 0.9999


async def under_load(fleet: Fleet, strike, after: int = 30) -> list[Result]:
    """Submit the whole workload, strike once `after` results are back, await every result."""
    jobs, _ = workload()
    async with Client(fleet.endpoint, timeout_s=WAIT_S) as client:
        futures = await client.submit(jobs)
        pending = set(futures)
        while len(futures) - len(pending) < after:
            _, pending = await asyncio.wait(
                pending, timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED
            )
        assert pending, "the load finished before the strike; nothing was tested"
        await strike(client)
        await asyncio.wait_for(asyncio.gather(*futures), WAIT_S)
        return [f.result() for f in futures]


@pytest.fixture
def fleet() -> Fleet:
    f = start("parallel.pipeline=2", "batching.max_batch_tokens=1024", "workers.dead_after_ms=5000")
    try:
        yield f
    finally:
        f.stop()


def test_sigkill_a_worker_mid_load(fleet: Fleet) -> None:
    async def strike(client: Client) -> None:
        workers = (await client.status())["workers"]
        os.kill(workers[-1]["pid"], signal.SIGKILL)  # the last stage, holding batches in flight

    check(asyncio.run(under_load(fleet, strike)))
    status = asyncio.run(_status(fleet))
    assert all(w["restarts"] == 1 and w["state"] == "ready" for w in status["workers"])
    assert "exited with code -9" in status["workers"][-1]["last_cause"]


def test_sigkill_the_controller_mid_load(fleet: Fleet) -> None:
    async def strike(client: Client) -> None:
        [ctrl] = (await client.status())["controllers"]
        os.kill(ctrl["pid"], signal.SIGKILL)

    check(asyncio.run(under_load(fleet, strike)))


async def _status(fleet: Fleet) -> dict:
    async with Client(fleet.endpoint, timeout_s=30) as client:
        return await client.status()


def test_a_job_that_kills_its_worker_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATON_FAULT_EXIT_ON_TOKEN", "29145")  # the token "zebra"
    f = start("jobs.max_attempts=3", "workers.dead_after_ms=5000")
    try:
        jobs = [
            {"id": f"n{i}", "task": "embed", "text": f"an ordinary sentence, number {i}"}
            for i in range(20)
        ]
        jobs.insert(7, {"id": "poison", "task": "embed", "text": "a zebra in the batch"})

        async def go() -> list[Result]:
            async with Client(f.endpoint, timeout_s=WAIT_S) as client:
                futures = await client.submit(jobs)
                await asyncio.wait_for(asyncio.gather(*futures), WAIT_S)
                after = await client.embed(["the fleet still serves"])
                return [fut.result() for fut in futures] + after

        results = asyncio.run(go())
        by = {r.id: r for r in results}
        assert by["poison"].error["code"] == "retries_exhausted"
        assert all(r.status == "ok" for r in results if r.id != "poison")
        assert asyncio.run(_status(f))["workers"][0]["restarts"] == 3
    finally:
        f.stop()


def test_kill_everything_and_restart_on_the_same_journal(tmp_path: Path) -> None:
    journal, log = tmp_path / "journal.sqlite3", tmp_path / "executions.log"
    sets = (
        "parallel.pipeline=2",
        "batching.max_batch_tokens=1024",
        f'journal.path="{journal}"',
        f'jobs.execution_log="{log}"',
    )
    jobs, _ = workload()
    first = start(*sets)
    try:

        async def strike(client: Client) -> None:
            os.killpg(first.proc.pid, signal.SIGKILL)  # broker, controller, workers: all at once

        with pytest.raises((TimeoutError, asyncio.TimeoutError)):
            asyncio.run(under_load_short(first, strike))
    finally:
        first.stop()
    db = sqlite3.connect(journal)
    done = {r[0] for r in db.execute("SELECT id FROM jobs WHERE state='done'")}
    accepted = {r[0] for r in db.execute("SELECT id FROM jobs")}
    db.close()
    assert done and accepted == {j["id"] for j in jobs}  # all were accepted, some finished
    before = log.read_text().split("\n")[:-1]  # a line cut off by the kill is not counted

    second = start(*sets)
    try:
        src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        src.write_text("".join(json.dumps(j) + "\n" for j in jobs))
        cmd = [sys.executable, "-m", "baton.cli", "submit", "--endpoint", second.endpoint]
        run = subprocess.run(
            [*cmd, "--input", str(src), "--output", str(out), "--timeout", str(WAIT_S)],
            capture_output=True,
            text=True,
            timeout=WAIT_S * 2,
        )
        assert run.returncode == 0, run.stderr
    finally:
        second.stop()
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    check(
        [
            Result(r["id"], r["status"], r.get("embedding"), error=r.get("error"))
            for r in (rows[j["id"]] for j in jobs)
        ]
    )
    rerun = set(log.read_text().split("\n")[len(before) :]) - {""}
    assert not rerun & done, f"ran again after it was done: {sorted(rerun & done)[:5]}"


async def under_load_short(fleet: Fleet, strike) -> list[Result]:
    """As under_load, but with a short bound: after the strike nothing will answer."""
    jobs, _ = workload()
    async with Client(fleet.endpoint, timeout_s=5) as client:
        futures = await client.submit(jobs)
        pending = set(futures)
        while len(futures) - len(pending) < 30:
            _, pending = await asyncio.wait(
                pending, timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED
            )
        assert pending
        await strike(client)
        await asyncio.wait_for(asyncio.gather(*futures), 5)
        return [f.result() for f in futures]
