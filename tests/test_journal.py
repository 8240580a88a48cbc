"""The journal and the broker's job table: durability, recovery, attempts, deadlines, cancel."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
import torch

from broker.jobs import Job, State, Table
from broker.journal import Journal


def jobs(n: int, model: str = "m", deadline: float | None = None) -> list[Job]:
    return [Job(f"j{i}", "embed", f"text {i}", model, deadline=deadline) for i in range(n)]


def ok(jid: str) -> dict:
    return {"id": jid, "status": "ok", "tokens": 3, "truncated": False}


@pytest.mark.parametrize("durability", ["sync", "batch", "off"])
async def test_accepted_jobs_survive_a_restart(tmp_path: Path, durability: str) -> None:
    path = str(tmp_path / "j.sqlite3")
    journal = Journal(path, durability)
    table = Table(journal, max_attempts=3)
    table.add(jobs(5))
    await journal.commit()
    [first] = table.take("m", 1, b"c1")
    table.finish(first.id, ok(first.id), torch.ones(4), b"c1")
    await journal.close()

    again = Journal(path, durability)
    table = Table(again, max_attempts=3)
    assert table.recover() == 4  # every unfinished job, the running one included
    assert [j.id for j in table.take("m", 10, b"c2")] == ["j1", "j2", "j3", "j4"]
    done = table.get("j0")  # the finished one is read back with its result
    assert done is not None and done.state is State.DONE
    assert torch.equal(done.embedding, torch.ones(4))
    await again.close()


async def test_commits_are_grouped(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "j.sqlite3"), "batch")
    applied: list[int] = []
    inner = journal._apply
    # count transactions, and the rows each one wrote
    journal._apply = lambda ops: (applied.append(sum(len(r) for _, r in ops)), inner(ops))[1]
    table = Table(journal, max_attempts=3)

    async def submit(i: int) -> None:
        table.add([Job(f"s{i}", "embed", "t", "m")])
        await journal.commit()

    await asyncio.gather(*(submit(i) for i in range(200)))
    await journal.close()
    assert sum(applied) == 200 and len(applied) < 200
    rows = sqlite3.connect(tmp_path / "j.sqlite3").execute("SELECT count(*) FROM jobs").fetchone()
    assert rows == (200,)


async def test_lost_attempts_requeue_then_fail(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "j.sqlite3"))
    table = Table(journal, max_attempts=2)
    table.add(jobs(2))
    table.take("m", 2, b"c1")
    n, failed = table.requeue(b"c1", "controller lost")
    assert (n, failed) == (2, [])
    assert [j.attempts for j in table.take("m", 2, b"c2")] == [1, 1]
    n, failed = table.requeue(b"c2", "controller lost")
    assert n == 0 and [j.entry["error"]["code"] for j in failed] == ["retries_exhausted"] * 2
    assert "2 attempts lost" in failed[0].entry["error"]["message"]
    assert table.summary()["failed"] == 2 and table.queued == table.running == 0
    await journal.close()


async def test_late_and_duplicate_completions_are_dropped(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "j.sqlite3"))
    table = Table(journal, max_attempts=3)
    table.add(jobs(1))
    table.take("m", 1, b"old")
    table.requeue(b"old", "silent")
    table.take("m", 1, b"new")
    assert table.finish("j0", ok("j0"), None, b"old") is None  # the old lease is gone
    assert table.finish("j0", ok("j0"), None, b"new") is not None
    assert table.finish("j0", ok("j0"), None, b"new") is None  # a duplicate
    assert table.summary()["done"] == 1
    await journal.close()


async def test_deadline_and_cancel(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "j.sqlite3"))
    table = Table(journal, max_attempts=3)
    table.add([Job("late", "embed", "t", "m", deadline=100.0), Job("keep", "embed", "t", "m")])
    table.add([Job("gone", "embed", "t", "m")])
    [late] = table.expire(now=100.5)
    assert late.entry["error"]["code"] == "deadline_exceeded"
    assert table.cancel("gone").entry["error"]["code"] == "cancelled"
    assert table.cancel("gone") is None  # already ended
    assert [j.id for j in table.take("m", 10, b"c")] == ["keep"]
    assert table.summary() == {
        "accepted": 3,
        "done": 0,
        "failed": 1,
        "cancelled": 1,
        "retried": 0,
        "queued": 0,
        "queued_bytes": 0,
        "running": 1,
    }
    await journal.close()
