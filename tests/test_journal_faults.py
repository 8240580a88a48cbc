"""The journal is the truth, or nothing is acknowledged: one owner, no silent loss at open, and a
journal that cannot be written refuses, holds and resumes. Real SQLite files, real OS faults,
real `baton up`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CONFIG, dealer, start

from baton.client import Client, Result
from baton.launch import REPO, Fleet, free_port
from broker.journal import Journal, JournalBusy
from broker.journal_repair import JournalDamaged, check_wal
from wire.protocol import Kind, Limits, decode, encode

WAIT_S = 120
N = 2000
PER_COMMIT = 100
MODEL = "all-MiniLM-L6-v2"

# the real Journal writes n queued echo jobs in commits of `per`, then its process dies without
# a checkpoint (os._exit, as a crash): the jobs are in the WAL only
MAKE = """
import asyncio, os, sys
from broker.journal import Journal
async def main(path, n, per):
    j = Journal(path, "batch")
    for b in range(0, n, per):
        j.add([(f"q{i}", sys.argv[4], "echo", f"text number {i} " * 3, None, None, None, None, 0)
               for i in range(b, min(n, b + per))])
        await j.commit()
    os._exit(0)
asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


def make_journal(path: Path, n: int = N, per: int = PER_COMMIT) -> None:
    subprocess.run(
        [sys.executable, "-c", MAKE, str(path), str(n), str(per), MODEL],
        cwd=REPO,
        check=True,
        timeout=WAIT_S,
    )
    assert Path(f"{path}-wal").stat().st_size > 0


def count(path: Path) -> int:
    """What plain SQLite makes of the journal (run on a copy: opening it changes the files)."""
    copy = path.parent / "sqlite-view"
    copy.mkdir()
    for p in path.parent.glob(f"{path.name}*"):
        if p.is_file():
            shutil.copy(p, copy / p.name)
    con = sqlite3.connect(copy / path.name)
    try:
        return con.execute("SELECT count(*) FROM jobs").fetchone()[0]
    except sqlite3.OperationalError as e:
        assert "no such table" in str(e)  # the table itself was created in the dropped part
        return 0
    finally:
        con.close()
        shutil.rmtree(copy)


def damage(path: Path, offset: int, n: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(os.urandom(n))


def snapshot(path: Path) -> dict[str, bytes]:
    """The journal's files (its lock aside: that names whoever looked last)."""
    files = path.parent.glob(f"{path.name}*")
    return {p.name: p.read_bytes() for p in files if p.is_file() and p.suffix != ".lock"}


def baton(*args: str, timeout: float = WAIT_S) -> tuple[int, str]:
    """A `baton` command in its own process group, which is killed whatever happens (a `baton up`
    that should have refused but started must not leave its fleet behind)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton.cli", *args],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def up_once(*sets: str) -> tuple[int, str]:
    endpoint = f"endpoints.client=tcp://127.0.0.1:{free_port()}"
    # no HTTP gateway: it is not under test, and two of these may run at once
    args = ["up", "--config", str(CONFIG), "--set", endpoint, "--set", "workers.threads=1"]
    args += ["--set", 'gateway.listen=""']
    return baton(*args, *(a for s in sets for a in ("--set", s)), timeout=60)


def echo(prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}{i}", "task": "echo", "text": f"{prefix} job {i}"} for i in range(n)]


async def all_ok(client: Client, jobs: list[dict]) -> list[Result]:
    futures = await client.submit(jobs)
    results = await asyncio.wait_for(asyncio.gather(*futures), WAIT_S)
    bad = [(r.id, r.error) for r in results if r.status != "ok"]
    assert not bad, bad[:5]
    return results


def executions(log: Path) -> list[str]:
    return log.read_text().split("\n")[:-1] if log.exists() else []  # a cut-off line is not one


# --- the WAL and the main file, checked before SQLite may drop anything ---


def test_an_intact_wal_and_a_torn_tail_pass(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite3"
    make_journal(journal)
    wal = Path(f"{journal}-wal")
    assert check_wal(wal) is None
    # a crash in the middle of writing the last transaction: its commit frame never made it
    with wal.open("r+b") as f:
        f.truncate(wal.stat().st_size - 4096 - 24 - 1000)
    assert check_wal(wal) is None
    j = Journal(str(journal))
    try:
        assert len(list(j.unfinished())) == N - PER_COMMIT  # SQLite discards the torn commit
    finally:
        asyncio.run(j.close())


def test_garbage_in_the_wal_is_refused_before_sqlite_drops_it(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite3"
    make_journal(journal)
    wal = Path(f"{journal}-wal")
    damage(wal, wal.stat().st_size // 2, 3000)
    before = snapshot(journal)
    silently = count(journal)
    assert 0 < silently < N  # the premise: plain SQLite opens it and has forgotten jobs
    with pytest.raises(JournalDamaged, match="later committed"):
        Journal(str(journal))
    assert snapshot(journal) == before  # refused untouched

    code, out = baton("journal", "recover", str(journal))
    assert code == 0, out
    kept, lost = map(int, re.search(r"kept (\d+) jobs .* lost (\d+)", out).groups())
    assert kept == silently and kept + lost == N, out
    [aside] = tmp_path.glob("journal.sqlite3.damaged-*")
    # moved aside whole, never deleted
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == before
    j = Journal(str(journal))
    try:
        assert [r.id for r in j.unfinished()] == [f"q{i}" for i in range(kept)]
    finally:
        asyncio.run(j.close())


def test_a_bad_wal_header_is_refused_and_its_frames_recovered(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite3"
    make_journal(journal)
    damage(Path(f"{journal}-wal"), 0, 8)  # magic and version: SQLite would ignore the whole WAL
    assert count(journal) == 0
    with pytest.raises(JournalDamaged, match="WAL header is bad"):
        Journal(str(journal))
    code, out = baton("journal", "recover", str(journal))
    assert code == 0 and f"kept {N} jobs ({N} unfinished, 0 finished); lost 0" in out, out


def test_a_main_file_failing_quick_check_is_refused_then_recovered(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite3"
    make_journal(journal)
    con = sqlite3.connect(journal)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every job into the main file
    con.close()
    data = journal.read_bytes()
    page = data.index(b"text number 1500 ") // 4096  # a leaf page of the jobs table
    damage(journal, page * 4096 + 8, 200)  # its cell pointers
    code, out = up_once(f'journal.path="{journal}"')
    assert code == 2 and "quick_check" in out and f"baton journal recover {journal}" in out, out
    code, out = baton("journal", "recover", str(journal))
    assert code == 0, out
    kept, lost = map(int, re.search(r"kept (\d+) jobs .* lost (\d+)", out).groups())
    assert lost > 0 and kept + lost == N, out
    assert baton("journal", "check", str(journal))[0] == 0


def test_one_journal_one_owner_in_process(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.sqlite3")
    first = Journal(path)
    try:
        with pytest.raises(JournalBusy, match=f"in use by pid {os.getpid()}"):
            Journal(path)
    finally:
        asyncio.run(first.close())
    asyncio.run(Journal(path).close())  # released with the close


# --- real `baton up` ---


def test_a_second_baton_up_on_one_journal_refuses(tmp_path: Path) -> None:
    sets = (f'journal.path="{tmp_path / "journal.sqlite3"}"',)
    first = start(*sets)
    second: Fleet | None = None
    try:
        code, out = up_once(*sets)
        assert code == 2 and f"in use by pid {first.proc.pid}" in out, out
        os.killpg(first.proc.pid, signal.SIGKILL)  # the owner dies without a word
        first.proc.wait(WAIT_S)
        second = start(*sets)  # its lock died with it
        status = asyncio.run(_status(second))
        assert status["journal"]["ok"] is True
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_a_damaged_journal_is_refused_and_the_fleet_runs_what_was_recovered(
    tmp_path: Path,
) -> None:
    journal, log = tmp_path / "journal.sqlite3", tmp_path / "executions.log"
    make_journal(journal)
    wal = Path(f"{journal}-wal")
    damage(wal, wal.stat().st_size // 3, 5000)
    before = snapshot(journal)
    code, out = up_once(f'journal.path="{journal}"')
    assert code == 2 and f"baton journal recover {journal}" in out, out
    assert snapshot(journal) == before
    code, out = baton("journal", "recover", str(journal))
    assert code == 0, out
    kept, lost = map(int, re.search(r"kept (\d+) jobs .* lost (\d+)", out).groups())
    assert 0 < kept < N and kept + lost == N, out

    fleet = start(f'journal.path="{journal}"', f'jobs.execution_log="{log}"')
    try:
        # the same jobs again (same id, same content): an id with other content is refused
        jobs = [
            {"id": f"q{i}", "task": "echo", "text": f"text number {i} " * 3} for i in range(kept)
        ]

        async def go() -> None:
            async with Client(fleet.endpoint, timeout_s=WAIT_S) as client:
                await all_ok(client, jobs)  # attaches to the recovered jobs

        asyncio.run(go())
    finally:
        fleet.stop()
    ran = executions(log)
    assert sorted(ran) == sorted(j["id"] for j in jobs)  # each recovered job ran, once


async def _status(fleet: Fleet) -> dict:
    async with Client(fleet.endpoint, timeout_s=30) as client:
        return await client.status()


async def until(client: Client, ok: Callable[[dict], bool]) -> dict:
    """Status, polled (bounded) until `ok`: the broker's journal health is another process's
    state, and this is how it shows it."""
    deadline = time.monotonic() + WAIT_S
    while True:
        status = await client.status()
        if ok(status):
            return status
        assert time.monotonic() < deadline, status
        await asyncio.sleep(0.05)


def refusal(endpoint: str) -> list[dict]:
    """A raw submit's refusal entries (the client does not keep `retry_after_ms`)."""
    with dealer(endpoint) as s:
        s.send_multipart(encode(Kind.SUBMIT, {"jobs": echo("raw", 3), "ref": 1}))
        out: list[dict] = []
        while not out:
            assert s.poll(WAIT_S * 1000), "no reply"
            msg = decode(s.recv_multipart(), Limits(), frozenset(Kind))
            if msg.kind == Kind.RESULTS:
                out = msg.body["results"]
            else:
                assert msg.kind == Kind.ACCEPTED and msg.body["ids"] == [], msg
        return out


class FileSizeLimit:
    """RLIMIT_FSIZE 0 on the running `baton up`: every write to a file fails (EFBIG), as on a
    disk that cannot be written. Root may set another process's soft limit; no CAP needed."""

    name = "file-size limit"

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.limits = resource.prlimit(pid, resource.RLIMIT_FSIZE)

    def apply(self) -> None:
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (0, self.limits[1]))

    def lift(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            resource.prlimit(self.pid, resource.RLIMIT_FSIZE, self.limits)


def test_an_unwritable_journal_refuses_holds_and_resumes(tmp_path: Path) -> None:
    journal, log = tmp_path / "journal.sqlite3", tmp_path / "executions.log"
    sets = (f'journal.path="{journal}"', f'jobs.execution_log="{log}"')
    delivered: list[str] = []
    first = start(*sets)
    fault = FileSizeLimit(first.proc.pid)
    try:

        async def go() -> None:
            async with Client(first.endpoint, timeout_s=WAIT_S) as client:
                delivered.extend(r.id for r in await all_ok(client, echo("a", 100)))
                fault.apply()
                held = asyncio.create_task(client.submit(echo("b", 50)))
                status = await until(client, lambda s: not s["journal"]["ok"])
                assert status["journal"]["error"] and status["journal"]["since"]
                for entry in await asyncio.to_thread(refusal, first.endpoint):
                    assert entry["error"]["code"] == "journal_unavailable", entry
                    assert entry["error"]["retry_after_ms"] > 0
                [c] = await asyncio.wait_for(
                    asyncio.gather(*await client.submit(echo("c", 1))), WAIT_S
                )
                assert c.error["code"] == "journal_unavailable"
                assert not held.done()  # b is not acknowledged: it is not durable
                fault.lift()  # nothing else: service resumes by itself
                b = await asyncio.wait_for(asyncio.gather(*await held), WAIT_S)
                assert all(r.status == "ok" for r in b)
                delivered.extend(r.id for r in b)
                delivered.extend(r.id for r in await all_ok(client, echo("d", 50)))
                assert (await client.status())["journal"]["ok"] is True

        asyncio.run(go())
        os.killpg(first.proc.pid, signal.SIGKILL)  # whatever was delivered must be durable
    finally:
        fault.lift()
        first.stop()
    text = first.log.read_text()
    assert text.count("cannot be written") == 1, first.tail()  # once per episode
    assert text.count("writable again") == 1, first.tail()
    ran = executions(log)
    assert sorted(ran) == sorted(delivered)  # every accepted job ran once; c never ran

    second = start(*sets)
    try:

        async def again() -> None:
            async with Client(second.endpoint, timeout_s=WAIT_S) as client:
                # the same jobs again: echo(prefix, n) made "<prefix> job <n>" for id <prefix><n>
                jobs = [{"id": i, "task": "echo", "text": f"{i[0]} job {i[1:]}"} for i in delivered]
                await all_ok(client, jobs)  # answered from the journal

        asyncio.run(again())
    finally:
        second.stop()
    rerun = set(executions(log)[len(ran) :])
    assert not rerun, f"delivered, then ran again after a restart: {sorted(rerun)[:5]}"
