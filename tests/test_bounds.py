"""Nothing grows without bound and nobody waits on somebody else's backlog: the deadline heap
forgets finished jobs, oversize frames are cut off before they are buffered, queued bytes are
capped, and clients are served in turn."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq
from conftest import dealer, start

from baton.client import BlockingClient, Client
from baton.launch import Fleet
from broker.jobs import Job, Table
from broker.journal import Journal
from wire.protocol import Kind, Limits, decode, encode, fitted, job_size

WAIT_S = 240


def rss(pid: int) -> int:
    """Resident bytes of a process, from the kernel's own accounting."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def test_the_deadline_heap_forgets_finished_jobs(tmp_path: Path) -> None:
    """50,000 jobs with a far deadline run and finish: the heap stays the size of the queue."""
    journal = Journal(str(tmp_path / "j.sqlite3"), "off")
    table = Table(journal, max_attempts=3)
    far = 4e9  # wall-clock seconds, long after this test
    most = 0
    for chunk in range(50):
        table.add([Job(f"d{chunk}-{i}", "echo", "t", "m", deadline=far) for i in range(1000)])
        for job in table.take("m", 1000, b"c"):
            table.finish(job.id, {"id": job.id, "status": "ok"}, None, b"c")
        most = max(most, len(table.deadlines))
    await journal.close()
    assert table.summary()["done"] == 50_000
    assert most <= 3 * 1000 + 1024, most  # bounded by the live queue, not by finished work


async def test_clients_are_served_in_turn(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "j.sqlite3"), "off")
    table = Table(journal, max_attempts=3)
    backlog = [Job(f"a{i}", "echo", "t", "m", client=b"A") for i in range(1000)]
    table.add(backlog)
    table.add([Job("b0", "echo", "t", "m", client=b"B")])
    first = [j.id for j in table.take("m", 4, b"c")]
    assert "b0" in first[:2], first  # not behind A's thousand
    await journal.close()


async def test_work_is_cut_to_the_byte_budget(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "j.sqlite3"), "off")
    table = Table(journal, max_attempts=3)
    table.add([Job(f"x{i}", "echo", "y" * 1000, "m") for i in range(10)])
    size = job_size("x0", "y" * 1000)
    assert len(table.take("m", 10, b"c", nbytes=3 * size)) == 3
    assert len(table.take("m", 10, b"c", nbytes=1)) == 1  # any credit moves the queue
    sizes = [5, 5, 5, 20, 1]
    cuts = list(fitted(lambda a, b: [(a, b), b"x" * sum(sizes[a:b])], len(sizes), 12))
    assert [c[0] for c in cuts] == [(0, 2), (2, 3), (3, 4), (4, 5)]
    await journal.close()


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bounds") / "executions.log"


@pytest.fixture(scope="module")
def fleet(executed: Path) -> Fleet:
    """Small batches so that a backlog is many batches deep; a low cap on queued bytes."""
    f = start(
        "batching.max_batch_tokens=64",
        "pipeline.max_inflight=2",
        "limits.max_queued_bytes=8000000",
        f'jobs.execution_log="{executed}"',
        "workers.dead_after_ms=600000",  # a worker held still (SIGSTOP) below is not dead
    )
    try:
        yield f
    finally:
        f.stop()


def test_one_job_is_not_held_back_by_another_clients_backlog(fleet: Fleet, executed: Path) -> None:
    """A queues 20,480 jobs, then B sends one: few of A's jobs run between B's arrival and B's
    run (a few batches), not A's whole backlog. Counted from the fleet's execution log. The
    worker is held still (SIGSTOP) while both submit, so that A's backlog is still there when B's
    job arrives however fast the fleet drains it, or however slowly a busy machine submits."""

    async def go() -> tuple[int, int]:
        async with (
            Client(fleet.endpoint, timeout_s=WAIT_S) as a,
            Client(fleet.endpoint, timeout_s=WAIT_S) as b,
        ):
            workers = [w["pid"] for w in (await b.status())["workers"]]
            for pid in workers:
                os.kill(pid, signal.SIGSTOP)
            try:
                backlog = await a.submit(
                    {"id": f"fair-a-{i}", "task": "echo", "text": "x"} for i in range(20_480)
                )
                done = (await b.status())["jobs"]["done"]  # before B's job exists
                [mine] = await b.submit([{"id": "fair-b", "task": "echo", "text": "x"}])
            finally:
                for pid in workers:
                    os.kill(pid, signal.SIGCONT)
            await asyncio.wait_for(mine, WAIT_S)
            assert mine.result().ok
            await asyncio.wait_for(asyncio.gather(*backlog), WAIT_S)
            return done, (await b.status())["jobs"]["done"]

    base = len(executed.read_text().splitlines()) if executed.exists() else 0
    done_before, done_after = asyncio.run(go())
    log = executed.read_text().splitlines()[base:]
    ahead = log.index("fair-b") - (done_before - (done_after - len(log)))
    # batches of 64 echo jobs: two in flight, two queued at the controller, one asked for
    assert len(log) - log.index("fair-b") > 2_000, "A's backlog was nearly gone: nothing tested"
    assert ahead <= 16 * 64, ahead


def test_a_frame_past_the_limit_is_cut_off_unbuffered(fleet: Fleet) -> None:
    """24 frames of 60 MB: ZeroMQ drops the sender at the first frame; the broker does not grow
    by the message, and serves the next client."""
    before = rss(fleet.proc.pid)
    chunk = b"\0" * (60 * 1024 * 1024)
    with dealer(fleet.endpoint) as sock:
        sock.send_multipart([encode(Kind.PING)[0], *[chunk] * 24], copy=False)
        del chunk
        with dealer(fleet.endpoint) as good:
            good.send_multipart(encode(Kind.PING, {"ref": 1}))
            assert good.poll(60_000), "the broker stopped answering"
            assert decode(good.recv_multipart(), Limits(), (Kind.PONG,)).body == {"ref": 1}
    assert rss(fleet.proc.pid) - before < 100 * 1024 * 1024


def test_queued_bytes_are_capped(fleet: Fleet) -> None:
    """2,000 jobs of 100,000 characters sent at once: past limits.max_queued_bytes they are
    refused `busy`, the rest run, and the broker's memory stays near the cap, not the load."""
    before = rss(fleet.proc.pid)
    text = "y" * 100_000
    limits = Limits(max_message_bytes=1 << 26)
    with dealer(fleet.endpoint) as sock:
        for m in range(40):
            jobs = [{"id": f"big-{m}-{i}", "task": "echo", "text": text} for i in range(50)]
            sock.send_multipart(encode(Kind.SUBMIT, {"jobs": jobs, "ref": m}))
        accepted: set[str] = set()
        ended: dict[str, str] = {}
        replies = 0
        while replies < 40 or not accepted <= set(ended):
            assert sock.poll(WAIT_S * 1000), "the broker stopped answering"
            msg = decode(sock.recv_multipart(), limits)
            if msg.kind == Kind.ACCEPTED:
                replies += 1
                accepted.update(msg.body["ids"])
            elif msg.kind == Kind.RESULTS:
                for e in msg.body["results"]:
                    ended[e["id"]] = e.get("error", {}).get("code", e["status"])
    refused = {i for i, code in ended.items() if code == "busy"}
    assert refused and accepted, (len(refused), len(accepted))
    assert {ended[i] for i in accepted} == {"ok"}
    assert rss(fleet.proc.pid) - before < 160 * 1024 * 1024


def test_unread_results_are_bounded_and_forgotten_when_the_client_leaves() -> None:
    """Two clients submit 4,000 embedding jobs each and never read; then disconnect. What waits
    for them stays within limits.max_unread_bytes each, and is gone once they have left."""
    f = start("limits.max_unread_bytes=200000", "batching.max_batch_tokens=256")
    n_jobs = 4_000
    try:
        texts = [f"an unread result, number {i}" for i in range(n_jobs)]
        socks = []
        try:
            for n in range(2):
                cm = dealer(f.endpoint)
                sock = cm.__enter__()
                socks.append(cm)
                # it reads nothing, and its kernel buffer is small: the broker holds the rest
                sock.setsockopt(zmq.RCVHWM, 1)
                sock.setsockopt(zmq.RCVBUF, 4096)
                for c in range(0, n_jobs, 500):
                    jobs = [
                        {"id": f"unread-{n}-{i}", "task": "embed", "text": t}
                        for i, t in enumerate(texts[c : c + 500], c)
                    ]
                    sock.send_multipart(encode(Kind.SUBMIT, {"jobs": jobs}))
            with BlockingClient(f.endpoint, timeout_s=WAIT_S) as client:
                status = eventually(client.status, lambda s: s["jobs"]["done"] == 2 * n_jobs)
                waiting = status["unread_bytes"]
            assert 0 < waiting <= 2 * 200_000 + 2 * (1 << 20), waiting
        finally:
            for cm in socks:
                cm.__exit__(None, None, None)
        with BlockingClient(f.endpoint, timeout_s=WAIT_S) as client:
            # the broker finds they left when it next tries to send to them (every heartbeat)
            eventually(client.status, lambda s: s["unread_bytes"] == 0)
            [r] = client.embed(["served after they left"])
            assert r.ok
    finally:
        f.stop()


def eventually(probe: Callable[[], dict], holds: Callable[[dict], bool], bound_s: float = 180):
    """Poll another process's state until it holds (no event to await there), bounded."""
    deadline = time.monotonic() + bound_s
    while not holds(got := probe()):
        assert time.monotonic() < deadline, f"not reached within {bound_s} s: {got}"
        time.sleep(0.1)  # the polling period
    return got


def test_a_huge_cancel_is_refused_from_its_length_alone(fleet: Fleet) -> None:
    """2.3 million ids in one 16 MiB cancel: refused `too_many_items` before the list is built,
    and another client's ping is answered right after."""
    ids = [f"{i:06x}" for i in range(2_300_000)]
    with dealer(fleet.endpoint) as bad, dealer(fleet.endpoint) as other:
        bad.send_multipart(encode(Kind.CANCEL, {"ids": ids, "ref": 1}))
        other.send_multipart(encode(Kind.PING, {"ref": 2}))
        assert other.poll(60_000) and bad.poll(60_000), "the broker stopped answering"
        assert decode(other.recv_multipart(), Limits()).body == {"ref": 2}
        refusal = decode(bad.recv_multipart(), Limits())
        assert refusal.kind == Kind.ERROR and refusal.body["code"] == "too_many_items"
