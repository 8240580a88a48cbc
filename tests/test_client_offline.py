"""baton.client and `baton submit/status/cancel` against a scripted peer, no fleet needed.

The peer is a real ROUTER in a thread that speaks the protocol and answers as a test scripts it;
the thing under test is the client, so the peer is only as clever as each test needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable

import pytest
import torch
import zmq

import baton.client.inflight as inflight_mod
from baton.cli import main
from baton.client import BlockingClient, Client, Result
from baton.launch import free_port
from wire.protocol import CLIENT_KINDS, Code, Kind, Limits, Message, ProtocolError, decode, encode

Send = Callable[..., None]
DIM = 4


class Peer:
    """A scripted broker: `handle(msg, send)` answers each decoded request."""

    def __init__(self, handle: Callable[[Message, Send], None]) -> None:
        self.handle = handle
        self.seen: list[Message] = []
        self.endpoint = ""
        self.failure: BaseException | None = None
        self._ready = threading.Event()
        self._ctx = zmq.Context()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "peer did not start"

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        stop = self._ctx.socket(zmq.PAIR)
        stop.connect("inproc://stop")
        with contextlib.suppress(zmq.Again):  # the serving thread may be gone already
            stop.send(b"", zmq.NOBLOCK)
        self._thread.join(10)
        stop.close(linger=0)
        self._ctx.term()
        if self.failure is not None:
            raise AssertionError("the scripted peer failed") from self.failure

    def submits(self) -> list[list[dict]]:
        return [m.body["jobs"] for m in self.seen if m.kind == Kind.SUBMIT]

    def _serve(self) -> None:
        router, stop = self._ctx.socket(zmq.ROUTER), self._ctx.socket(zmq.PAIR)
        stop.bind("inproc://stop")
        port = router.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._ready.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(stop, zmq.POLLIN)
        try:
            # bounded: no test keeps a peer idle for 60 s
            while (events := dict(poller.poll(60_000))) and stop not in events:
                ident, *frames = router.recv_multipart()
                msg = decode(frames, Limits(), CLIENT_KINDS)
                self.seen.append(msg)

                def send(kind, body=None, tensors=(), ident=ident):
                    router.send_multipart([ident, *encode(kind, body, tensors)])

                self.handle(msg, send)
        except BaseException as e:  # a script bug: reported by __exit__, not a hang in term()
            self.failure = e
        finally:
            router.close(linger=0)
            stop.close(linger=0)


def vector(text: str) -> list[float]:
    return [float(len(text)), 1.0, 2.0, 3.0]


def results(send: Send, entries: list[tuple[dict, str | None]]) -> None:
    """One results message: (entry, text-for-ok-rows) pairs; rows for ok entries, in order."""
    rows = []
    for e, text in entries:
        if e["status"] == "ok":
            e["row"] = len(rows)
            rows.append(vector(text))
    tensor = torch.tensor(rows, dtype=torch.float32).reshape(len(rows), DIM)
    send(Kind.RESULTS, {"results": [e for e, _ in entries]}, [tensor])


def ok(job: dict) -> tuple[dict, str]:
    return {"id": job["id"], "status": "ok", "tokens": len(job["text"]), "truncated": False}, job[
        "text"
    ]


def err(job_id: str, code: str, **extra) -> tuple[dict, None]:
    return {
        "id": job_id,
        "status": "error",
        "error": {"code": code, "message": code, **extra},
    }, None


def broker_like(msg: Message, send: Send) -> None:
    """Refuses empty texts and unknown tasks at the door, runs the rest at once."""
    ref = msg.body.get("ref")
    if msg.kind == Kind.SUBMIT:
        jobs = msg.body["jobs"]
        door = [j for j in jobs if not j["text"].strip() or j["task"] != "embed"]
        good = [j for j in jobs if j not in door]
        if door:
            results(
                send,
                [
                    err(j["id"], "empty_text" if j["task"] == "embed" else "unknown_task")
                    for j in door
                ],
            )
        send(Kind.ACCEPTED, {"ids": [j["id"] for j in good], "ref": ref})
        if good:
            results(send, [ok(j) for j in reversed(good)])  # order must not matter
    elif msg.kind == Kind.STATUS:
        send(Kind.STATUS, {"ref": ref, **STATUS})
    elif msg.kind == Kind.CANCEL:
        ids = msg.body["ids"]
        send(Kind.CANCELLED, {"ref": ref, "ids": ids[:1], "unknown": ids[1:]})
    elif msg.kind == Kind.PING:
        send(Kind.PONG, {"ref": ref})


STATUS = {
    "model": "minilm",
    "models": ["minilm"],
    "layout": {"tensor": 2, "pipeline": 1},
    "workers": [
        {"rank": r, "pid": 100 + r, "stage": 0, "tp_rank": r, "device": "cpu", "state": "ready"}
        | {"restarts": 0}
        for r in range(2)
    ],
    "jobs": {"accepted": 3, "queued": 0, "running": 1, "done": 2, "failed": 0, "cancelled": 0},
}


def jobs(*texts: str) -> list[dict]:
    return [{"id": f"j{i}", "task": "embed", "text": t} for i, t in enumerate(texts)]


# --- the asyncio client ---


async def test_results_route_to_futures_with_their_rows():
    with Peer(broker_like) as peer:
        async with Client(peer.endpoint, timeout_s=10) as c:
            futures = await c.submit(jobs("a", "bbb", "   ", "cc"))
            got = [await asyncio.wait_for(f, 10) for f in futures]
    assert [r.id for r in got] == ["j0", "j1", "j2", "j3"]
    assert [r.embedding for r in got if r.ok] == [vector("a"), vector("bbb"), vector("cc")]
    assert got[1].tokens == 3 and got[1].truncated is False
    assert got[2] == Result(
        "j2", "error", None, error={"code": "empty_text", "message": "empty_text"}
    )


async def test_embed_and_to_json_rows():
    with Peer(broker_like) as peer:
        async with Client(peer.endpoint, timeout_s=10) as c:
            got = await c.embed(["hello", ""])
    assert got[0].to_json() == {
        "id": got[0].id,
        "status": "ok",
        "embedding": vector("hello"),
        "tokens": 5,
        "truncated": False,
    }
    assert got[1].to_json() == {
        "id": got[1].id,
        "status": "error",
        "error": {"code": "empty_text", "message": "empty_text"},
    }
    assert got[0].id != got[1].id  # the client names jobs that came without an id


async def test_replies_matched_by_ref_not_by_order():
    held: list[Message] = []
    sends: list[Send] = []

    def handle(msg: Message, send: Send) -> None:
        held.append(msg)
        sends.append(send)
        if len(held) == 2:  # answer the second request first, after a stray reply
            send(Kind.PONG, {"ref": 10_000})
            for m in reversed(held):
                send(Kind.STATUS, {"ref": m.body["ref"], "model": f"for-{m.body['ref']}"})

    with Peer(handle) as peer:
        async with Client(peer.endpoint, timeout_s=10) as c:
            a, b = await asyncio.gather(c.status(), c.status())
    refs = [m.body["ref"] for m in held]
    assert len(set(refs)) == 2
    assert a["model"] == f"for-{refs[0]}" and b["model"] == f"for-{refs[1]}"


async def test_status_cancel_ping():
    with Peer(broker_like) as peer:
        async with Client(peer.endpoint, timeout_s=10) as c:
            assert await c.status() == STATUS
            assert await c.cancel(["x", "y"]) == {"ids": ["x"], "unknown": ["y"]}
            assert 0 <= await c.ping() < 10


async def test_error_reply_to_a_request_raises_with_its_code():
    def handle(msg: Message, send: Send) -> None:
        send(Kind.ERROR, {"code": "bad_field", "message": "field 'ids'", "ref": msg.body["ref"]})

    with Peer(handle) as peer:
        async with Client(peer.endpoint, timeout_s=10) as c:
            with pytest.raises(ProtocolError) as e:
                await c.cancel(["x"])
    assert e.value.code == Code.BAD_FIELD and "ids" in e.value.message


async def test_error_reply_to_a_submit_fails_exactly_its_jobs():
    def handle(msg: Message, send: Send) -> None:
        batch = msg.body["jobs"]
        if any(j["id"] == "j300" for j in batch):
            send(Kind.ERROR, {"code": "bad_field", "message": "jobs", "ref": msg.body["ref"]})
            return
        broker_like(msg, send)

    with Peer(handle) as peer:
        async with Client(peer.endpoint, timeout_s=10) as c:
            futures = await c.submit(jobs(*["t"] * 600))
            got = [await asyncio.wait_for(f, 10) for f in futures]
        sizes = [len(s) for s in peer.submits()]
    assert sizes == [256, 256, 88]  # chunked
    failed = [r for r in got if not r.ok]
    assert len(failed) == 256 and {r.id for r in failed} == {f"j{i}" for i in range(256, 512)}
    assert failed[0].error == {"code": "bad_field", "message": "jobs"}


async def test_too_large_is_halved_until_only_the_culprit_fails():
    def handle(msg: Message, send: Send) -> None:
        batch = msg.body["jobs"]
        if len(batch) > 3 or any(j["text"] == "huge" for j in batch):
            send(Kind.ERROR, {"code": "too_large", "message": "big", "ref": msg.body["ref"]})
            return
        broker_like(msg, send)

    with Peer(handle) as peer:
        async with Client(peer.endpoint, timeout_s=10) as c:
            got = await c.embed(["t"] * 10 + ["huge"] + ["t"] * 5)
        assert max(len(s) for s in peer.submits()) == 16
    assert [r.error["code"] for r in got if not r.ok] == ["too_large"]
    assert sum(r.ok for r in got) == 15


async def test_chunks_split_by_bytes_too():
    with Peer(broker_like) as peer:
        async with Client(peer.endpoint, limits=Limits(max_message_bytes=40_000)) as c:
            got = await c.embed(["x" * 5000] * 10)
        sizes = [len(s) for s in peer.submits()]
    assert all(r.ok for r in got) and sum(sizes) == 10 and max(sizes) <= 4


async def test_busy_is_retried_after_the_hint():
    def handle(msg: Message, send: Send) -> None:
        ref = msg.body["ref"]
        if len(peer.submits()) == 1:
            send(Kind.ACCEPTED, {"ids": [], "ref": ref})
            results(send, [err(j["id"], "busy", retry_after_ms=300) for j in msg.body["jobs"]])
        else:
            broker_like(msg, send)

    times: list[float] = []
    with Peer(lambda m, s: (times.append(time.monotonic()), handle(m, s))) as peer:
        async with Client(peer.endpoint, timeout_s=10) as c:
            got = await c.embed(["a", "b"])
        assert [len(s) for s in peer.submits()] == [2, 2]
    assert all(r.ok for r in got)
    assert times[1] - times[0] >= 0.3  # honoured retry_after_ms


async def test_busy_forever_surfaces_after_bounded_attempts(monkeypatch):
    monkeypatch.setattr(inflight_mod, "BUSY_BASE_S", 0.001)

    def handle(msg: Message, send: Send) -> None:
        send(Kind.ACCEPTED, {"ids": [], "ref": msg.body["ref"]})
        results(send, [err(j["id"], "busy") for j in msg.body["jobs"]])

    with Peer(handle) as peer:
        async with Client(peer.endpoint, timeout_s=10) as c:
            (got,) = await c.embed(["a"])
        assert len(peer.submits()) == inflight_mod.BUSY_ATTEMPTS + 1
    assert got.error["code"] == "busy"


async def test_a_missing_row_fails_its_job_not_the_client():
    def handle(msg: Message, send: Send) -> None:
        batch = msg.body["jobs"]
        send(Kind.ACCEPTED, {"ids": [j["id"] for j in batch], "ref": msg.body["ref"]})
        entries = [{**ok(j)[0], "row": i} for i, j in enumerate(batch)]
        send(Kind.RESULTS, {"results": entries}, [torch.zeros(len(batch) - 1, DIM)])

    with Peer(handle) as peer:
        async with Client(peer.endpoint, timeout_s=10) as c:
            got = await c.embed(["a", "b"])
    assert got[0].ok and got[0].embedding == [0.0] * DIM
    assert got[1].error["code"] == "internal"


async def test_duplicate_ids_are_sent_once_and_both_resolve():
    with Peer(broker_like) as peer:
        async with Client(peer.endpoint, timeout_s=10) as c:
            twice = [{"id": "same", "task": "embed", "text": "abc"}] * 2
            got = [await asyncio.wait_for(f, 10) for f in await c.submit(twice)]
        assert [len(s) for s in peer.submits()] == [1]
    assert got[0] == got[1] and got[0].ok


async def test_run_keeps_at_most_window_outstanding():
    window, total = 64, 300
    held: list[tuple[dict, Send]] = []
    seen = 0
    most = 0

    def handle(msg: Message, send: Send) -> None:
        nonlocal seen, most
        batch = msg.body["jobs"]
        send(Kind.ACCEPTED, {"ids": [j["id"] for j in batch], "ref": msg.body["ref"]})
        held.extend((j, send) for j in batch)
        seen += len(batch)
        most = max(most, len(held))
        # release only when the client is near its limit (it tops up in chunks of window // 4)
        if len(held) > window - window // 4 or seen == total:
            for j, s in held:
                results(s, [ok(j)])
            held.clear()

    source = ({"id": f"r{i}", "task": "embed", "text": "t" * (i % 7)} for i in range(total))
    with Peer(handle) as peer:
        async with Client(peer.endpoint, timeout_s=10) as c:
            got = [r async for r in c.run(source, window=window)]
    assert window - window // 4 < most <= window
    assert sorted(r.id for r in got) == sorted(f"r{i}" for i in range(total))


async def test_run_accepts_async_iterables():
    async def source():
        for i in range(5):
            yield {"id": f"a{i}", "task": "embed", "text": "x"}

    with Peer(broker_like) as peer:
        async with Client(peer.endpoint, timeout_s=10) as c:
            got = [r async for r in c.run(source(), window=2)]
    assert sorted(r.id for r in got) == [f"a{i}" for i in range(5)]


async def test_unreachable_endpoint_times_out_promptly():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    async with Client(endpoint, timeout_s=0.3) as c:
        for call in (c.status(), c.ping(), c.submit(jobs("a"))):
            t0 = time.monotonic()
            with pytest.raises(TimeoutError, match="no reply"):
                await call
            assert time.monotonic() - t0 < 3


async def test_accepted_but_never_answered_times_out():
    def handle(msg: Message, send: Send) -> None:
        send(Kind.ACCEPTED, {"ids": [j["id"] for j in msg.body["jobs"]], "ref": msg.body["ref"]})

    with Peer(handle) as peer:
        async with Client(peer.endpoint, timeout_s=0.3) as c:
            t0 = time.monotonic()
            with pytest.raises(TimeoutError, match="no result"):
                await c.embed(["a"])
            assert time.monotonic() - t0 < 3


def test_blocking_client():
    with Peer(broker_like) as peer, BlockingClient(peer.endpoint, timeout_s=10) as c:
        assert [r.ok for r in c.embed(["a", ""])] == [True, False]
        assert [r.id for r in c.submit(jobs("x"))] == ["j0"]
        assert sorted(r.id for r in c.run(jobs("p", "q", "r"), window=2)) == ["j0", "j1", "j2"]
        assert c.status()["model"] == "minilm"
        assert c.cancel(["x"]) == {"ids": ["x"], "unknown": []}
        assert c.ping() >= 0


# --- the CLI against the scripted peer ---

LINES = [
    '{"id": "a", "task": "embed", "text": "The quick brown fox."}',
    '{"id": "b", "task": "embed", "text": "A queue of jobs.", "model": "minilm"}',
    '{"id": "c", "task": "embed", "text": ""}',
    '{"id": "d", "task": "no-such-task", "text": "hello"}',
    "this is not json",
    "[1, 2, 3]",
    '{"task": "embed", "text": "no id"}',
    '{"id": "f", "task": "embed", "text": 5}',
    "",
    '{"id": "a", "task": "embed", "text": "again"}',
]


def test_submit_writes_one_row_per_line(tmp_path, capsys):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(LINES) + "\n")
    with Peer(broker_like) as peer:
        rc = main(
            ["submit", "--endpoint", peer.endpoint, "--input", str(src), "--output", str(dst)]
        )
        sent = [j["id"] for s in peer.submits() for j in s]
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    codes = sorted((r["id"], (r.get("error") or {}).get("code", r["status"])) for r in rows)
    assert codes == [
        ("a", "duplicate_id"),  # the repeat is its own error row; the first one ran
        ("a", "ok"),
        ("b", "ok"),
        ("c", "empty_text"),
        ("d", "unknown_task"),
        ("f", "bad_field"),
        ("line-5", "malformed"),
        ("line-6", "bad_field"),
        ("line-7", "bad_field"),
    ]
    assert sorted(sent) == ["a", "b", "c", "d"]  # invalid lines never went out
    by = {r["id"]: r for r in rows if r["status"] == "ok"}
    assert by["a"]["embedding"] == vector("The quick brown fox.")
    assert all(isinstance(r["error"]["message"], str) for r in rows if r["status"] == "error")


def test_submit_unreachable_exits_nonzero(tmp_path, capsys):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(LINES[0] + "\n")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    args = ["submit", "--endpoint", endpoint, "--input", str(src), "--output", str(dst)]
    assert main([*args, "--timeout", "0.3"]) == 1
    err = capsys.readouterr().err
    assert "no reply" in err and "1 jobs left unanswered" in err


def test_submit_missing_input(tmp_path, capsys):
    args = ["submit", "--endpoint", "tcp://127.0.0.1:1", "--input", str(tmp_path / "nope")]
    assert main([*args, "--output", str(tmp_path / "out")]) == 2
    assert "baton submit:" in capsys.readouterr().err


def test_status_json_and_table(capsys):
    with Peer(broker_like) as peer:
        assert main(["status", "--endpoint", peer.endpoint, "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == STATUS
        assert main(["status", "--endpoint", peer.endpoint]) == 0
        table = capsys.readouterr().out
    assert "minilm" in table and "tensor 2 x pipeline 1" in table and "tp_rank" in table


def test_status_unreachable(capsys):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    assert main(["status", "--endpoint", endpoint, "--json", "--timeout", "0.3"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "baton status:" in captured.err and "no reply" in captured.err


def test_cancel(capsys):
    with Peer(broker_like) as peer:
        assert main(["cancel", "--endpoint", peer.endpoint, "x", "y"]) == 0
    out = capsys.readouterr().out
    assert "cancelled: x" in out and "unknown:   y" in out


async def test_demo_push_counts_tokens_latency_and_failures(capsys):
    from baton.demo import push, report

    with Peer(broker_like) as peer:
        stats = await push(peer.endpoint, ["abc", "", "defgh"], window=2)
    assert stats.jobs == 3 and stats.tokens == 8 and len(stats.latencies) == 3
    assert dict(stats.failures) == {"empty_text": 1}
    report(stats)
    out = capsys.readouterr().out
    assert "jobs/s" in out and "tokens/s" in out and "p99" in out and "empty_text 1" in out
