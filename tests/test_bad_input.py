"""Bad input gets a clear, typed error to its sender, and the fleet goes on serving."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from unittest.mock import ANY

import msgpack
import pytest
import zmq
from conftest import dealer

from baton.client import BlockingClient
from baton.launch import Fleet
from wire.protocol import Limits, Message, decode, encode

WAIT_MS = 60_000
_ids = itertools.count()


@pytest.fixture
def sock(small_fleet: Fleet) -> Iterator[zmq.Socket]:
    with dealer(small_fleet.endpoint) as s:
        yield s


def recv(sock: zmq.Socket) -> Message:
    assert sock.poll(WAIT_MS), "no reply from the broker"
    return decode(sock.recv_multipart(), Limits(max_message_bytes=1 << 26))


def serves_on(fleet: Fleet) -> None:
    with BlockingClient(fleet.endpoint, timeout_s=120) as client:
        [result] = client.embed([f"still serving, {next(_ids)}"])
    assert result.status == "ok" and len(result.embedding) == 384


def head(**fields: object) -> bytes:
    return msgpack.packb({"v": 1, **fields})


BAD_MESSAGES = {
    "random bytes": ([b"\xc1\x00garbage"], "malformed"),
    "truncated msgpack": ([head(kind="submit", jobs=[{"text": "abc"}])[:-3]], "malformed"),
    "not a map": ([msgpack.packb([1, 2, 3])], "malformed"),
    "integer map keys": ([msgpack.packb({1: 2, "v": 1})], "malformed"),
    "ext type": ([head(kind="ping", x=msgpack.ExtType(7, b"boom"))], "malformed"),
    "wrong version": ([msgpack.packb({"v": 99, "kind": "ping"})], "unsupported_version"),
    "unknown kind": ([head(kind="explode")], "unknown_kind"),
    "kind not a string": ([head(kind=5)], "unknown_kind"),
    "too many frames": ([head(kind="ping"), *[b"x"] * 10], "too_many_frames"),
    # each frame within the limit (a frame past it is cut off by ZeroMQ: test_bounds.py)
    "oversize message": ([head(kind="submit", jobs=[]), *[b"\0" * 150_000] * 2], "too_large"),
    "too many ids": ([head(kind="cancel", ids=["x"] * 5000)], "too_many_items"),
    "jobs not a list": ([head(kind="submit", jobs="everything")], "bad_field"),
    "tensor header disagrees": (
        [head(kind="submit", jobs=[], tensors=[{"dtype": "float32", "shape": [4]}]), b"abc"],
        "bad_tensor",
    ),
    "tensor dtype not allowed": (
        [head(kind="submit", jobs=[], tensors=[{"dtype": "object", "shape": [1]}]), b"x"],
        "bad_tensor",
    ),
    "frames without tensor header": ([head(kind="ping"), b"1234"], "bad_tensor"),
}


@pytest.mark.parametrize("frames, code", BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
def test_bad_message_gets_typed_error(
    small_fleet: Fleet, sock: zmq.Socket, frames: list, code: str
) -> None:
    sock.send_multipart(frames)
    reply = recv(sock)
    assert reply.kind == "error"
    assert reply.body["code"] == code
    assert isinstance(reply.body["message"], str) and reply.body["message"]
    serves_on(small_fleet)


BAD_JOBS = {
    "empty text": ({"task": "embed", "text": ""}, "empty_text"),
    "whitespace text": ({"task": "embed", "text": " \n\t "}, "empty_text"),
    "unknown task": ({"task": "classify", "text": "hi"}, "unknown_task"),
    "unknown model": ({"task": "embed", "text": "hi", "model": "gpt-9"}, "unknown_model"),
    "text not a string": ({"task": "embed", "text": 42}, "bad_field"),
    "task missing": ({"text": "hi"}, "bad_field"),
    "unknown field": ({"task": "embed", "text": "hi", "colour": "red"}, "bad_field"),
    "over-long text": ({"task": "embed", "text": "word " * 5000}, "text_too_long"),
}


@pytest.mark.parametrize("job, code", BAD_JOBS.values(), ids=BAD_JOBS.keys())
def test_bad_job_fails_alone(small_fleet: Fleet, sock: zmq.Socket, job: dict, code: str) -> None:
    bad, good = f"bad-{next(_ids)}", f"good-{next(_ids)}"
    jobs = [{"id": bad, **job}, {"id": good, "task": "embed", "text": "a good neighbour"}]
    sock.send_multipart(encode("submit", {"jobs": jobs, "ref": 1}))
    ended = {}
    accepted = None
    while len(ended) < 2 or accepted is None:
        msg = recv(sock)
        if msg.kind == "accepted":
            accepted = msg.body["ids"]
        else:
            assert msg.kind == "results", msg
            ended.update({e["id"]: e for e in msg.body["results"]})
    assert accepted == [good]
    assert ended[bad]["status"] == "error" and ended[bad]["error"]["code"] == code
    assert ended[bad]["error"]["message"]
    assert ended[good]["status"] == "ok"


def test_bad_job_id_type(sock: zmq.Socket) -> None:
    sock.send_multipart(encode("submit", {"jobs": [{"id": 7, "task": "embed", "text": "hi"}]}))
    assert recv(sock).body == {"ids": [], "ref": None}
    [entry] = recv(sock).body["results"]
    assert entry["id"] is None and entry["error"]["code"] == "bad_field"


def test_duplicate_id_in_one_submit(sock: zmq.Socket) -> None:
    jid = f"dup-{next(_ids)}"
    jobs = [
        {"id": jid, "task": "embed", "text": "one"},
        {"id": jid, "task": "embed", "text": "two"},
    ]
    sock.send_multipart(encode("submit", {"jobs": jobs}))
    codes = []
    while len(codes) < 2:
        msg = recv(sock)
        if msg.kind == "results":
            codes += [e.get("error", {}).get("code", e["status"]) for e in msg.body["results"]]
    assert sorted(codes) == ["duplicate_id", "ok"]


def test_queue_full_answers_busy(small_fleet: Fleet, sock: zmq.Socket) -> None:
    # limits.max_queued = 64 for this fleet, and one submit is admitted before any dispatch
    jobs = [{"id": f"q-{next(_ids)}", "task": "embed", "text": f"tiny {i}"} for i in range(100)]
    sock.send_multipart(encode("submit", {"jobs": jobs}))
    accepted, busy, ok = None, [], set()
    while accepted is None or len(ok) + len(busy) < 100:
        msg = recv(sock)
        if msg.kind == "accepted":
            accepted = msg.body["ids"]
            continue
        for e in msg.body["results"]:
            if e["status"] == "ok":
                ok.add(e["id"])
            else:
                assert e["error"]["code"] == "busy" and e["error"]["retry_after_ms"] > 0
                busy.append(e["id"])
    assert len(accepted) == 64 and len(busy) == 36
    assert ok == set(accepted)  # every accepted job still ends, and ends ok
    serves_on(small_fleet)


def test_resubmitted_id_returns_stored_result(small_fleet: Fleet) -> None:
    job = {"id": f"idem-{next(_ids)}", "task": "embed", "text": "asked twice"}
    with BlockingClient(small_fleet.endpoint, timeout_s=120) as client:
        [first] = client.submit([job])
        before = client.status()["jobs"]["accepted"]
        [again] = client.submit([job])
        after = client.status()["jobs"]["accepted"]
    assert first.status == again.status == "ok"
    assert first.embedding == again.embedding
    assert after == before  # not admitted (nor run) a second time


def test_cancel_unknown_id(small_fleet: Fleet) -> None:
    with BlockingClient(small_fleet.endpoint, timeout_s=30) as client:
        reply = client.cancel(["never-submitted"])
    assert reply["ids"] == [] and reply["unknown"] == ["never-submitted"]


def test_echo_and_embed_mixed(small_fleet: Fleet) -> None:
    """`echo` is routed through every stage like any job but answered without the model."""
    jobs = [
        {"id": f"mix-{next(_ids)}", "task": "echo" if i % 3 else "embed", "text": f"job {i}"}
        for i in range(30)
    ]
    with BlockingClient(small_fleet.endpoint, timeout_s=120) as client:
        results = client.submit(jobs)
        stats = client.status()["controllers"][0]["stats"]
    for job, r in zip(jobs, results, strict=True):
        assert r.status == "ok"
        assert (r.embedding is None) == (job["task"] == "echo")
    assert stats["batches"] >= 2 and stats["tokens"] <= stats["padded_tokens"]


def test_error_replies_name_their_request(sock: zmq.Socket) -> None:
    """Refusals from decode and from a handler both echo the request's ref."""
    sock.send_multipart([head(kind="submit", jobs=[], ref=7), *[b"\0" * 150_000] * 2])
    assert recv(sock).body == {"code": "too_large", "message": ANY, "ref": 7}
    sock.send_multipart([head(kind="submit", jobs="everything", ref=8)])
    assert recv(sock).body == {"code": "bad_field", "message": ANY, "ref": 8}
