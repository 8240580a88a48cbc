"""Fuzzing the client endpoint of a live broker: every message gets a typed error or is dropped,
memory stays bounded, and a normal job right after still succeeds."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq
from conftest import dealer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baton.client import BlockingClient
from baton.launch import Fleet
from wire.protocol import Code, Limits, decode, encode

CODES = {str(c) for c in Code}
LIMIT = 200_000  # small_fleet's limits.max_message_bytes
_refs = itertools.count(1)

ints = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), ints), inner, max_size=4),
    ),
    max_leaves=12,
)
kinds = st.one_of(
    st.sampled_from(["submit", "status", "cancel", "ping", "results", "jobs", "x"]), values
)
jobs = st.lists(
    st.dictionaries(
        st.sampled_from(["id", "task", "text", "model", "deadline_ms", "extra"]), values, max_size=5
    ),
    max_size=4,
)
tensor_desc = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(["float32", "int64", "object", "f8"]), values),
        "shape": values,
    }
)


def _pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


headers = st.one_of(
    st.builds(
        lambda k, b: _pack({"v": 1, "kind": k, **b}),
        kinds,
        st.dictionaries(st.text(max_size=8), values, max_size=3),
    ),
    st.builds(lambda j: _pack({"v": 1, "kind": "submit", "jobs": j}), jobs),
    st.builds(
        lambda d: _pack({"v": 1, "kind": "submit", "jobs": [], "tensors": d}),
        st.lists(tensor_desc, max_size=3),
    ),
    st.builds(lambda m: _pack(m), st.dictionaries(ints, values, max_size=3)),  # integer keys
    st.builds(
        lambda c, d: _pack({"v": 1, "kind": "ping", "x": msgpack.ExtType(c, d)}),
        st.integers(0, 127),
        st.binary(max_size=8),
    ),
    st.builds(
        lambda b, n: b[:n],
        st.builds(lambda j: _pack({"v": 1, "kind": "submit", "jobs": j}), jobs),
        st.integers(0, 40),
    ),
    st.binary(max_size=64),
)
messages = st.one_of(
    st.builds(lambda h, rest: [h, *rest], headers, st.lists(st.binary(max_size=64), max_size=3)),
    st.builds(lambda h, n: [h, *[b"f"] * n], headers, st.integers(8, 12)),  # too many frames
    # oversize in sum, each frame within the limit (a frame past it is cut off: test_bounds.py)
    st.builds(
        lambda h, n: [h, b"\0" * n, b"\0" * n], headers, st.integers(LIMIT // 2, LIMIT - 1024)
    ),
    st.lists(st.binary(max_size=32), min_size=1, max_size=4),
)


@pytest.fixture(scope="module")
def sock(small_fleet: Fleet) -> Iterator[zmq.Socket]:
    with dealer(small_fleet.endpoint) as s:
        yield s


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@settings(
    max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
@given(frames=messages)
def test_fuzzed_messages(sock: zmq.Socket, frames: list[bytes]) -> None:
    sock.send_multipart(frames)
    # a ping behind it: every reply before the pong answers the fuzzed message
    ref = next(_refs)
    sock.send_multipart(encode("ping", {"ref": ref}))
    while True:
        assert sock.poll(30_000), "the broker stopped answering"
        msg = decode(sock.recv_multipart(), Limits(max_message_bytes=1 << 26))
        if msg.kind == "pong" and msg.body.get("ref") == ref:
            break
        if msg.kind == "error":
            assert msg.body["code"] in CODES and msg.body["message"]
        else:  # a fuzzed message that happened to be a valid request gets its ordinary reply
            assert msg.kind in {"accepted", "results", "status", "cancelled", "pong"}
            for e in msg.body.get("results", []):
                assert e["status"] == "ok" or e["error"]["code"] in CODES


def storm(sock: zmq.Socket, n: int = 1000, window: int = 20) -> None:
    """n junk messages of 100 kB each, `window` at a time, each answered with a typed error.

    A window rather than a flood: ZeroMQ may buffer a flood in the broker's process, and how much
    of it is buffered at once depends on scheduling; per-message state left behind does not.
    """
    junk = [_pack({"v": 1, "kind": "submit", "jobs": [{"text": 5}] * 50}), b"\0" * (LIMIT // 2)]
    for _ in range(n // window):
        for _ in range(window):
            sock.send_multipart(junk)
        for _ in range(window):
            assert sock.poll(60_000), "the broker stopped answering"
            msg = decode(sock.recv_multipart(), Limits(max_message_bytes=1 << 26))
            assert msg.kind == "error" and msg.body["code"] in CODES


def test_memory_bounded_and_still_serving(small_fleet: Fleet, sock: zmq.Socket) -> None:
    """Runs after the fuzzing above (same module): storms of junk leave the broker's memory flat
    (the first storm warms the allocator and ZeroMQ's buffers up), and it serves on."""
    pid = small_fleet.proc.pid
    storm(sock)
    warm = rss_kb(pid)
    for _ in range(3):
        storm(sock)  # 300 MB more through the door
    assert rss_kb(pid) - warm < 32 * 1024
    with BlockingClient(small_fleet.endpoint, timeout_s=120) as client:
        [r] = client.embed(["a normal job after the storm"])
    assert r.status == "ok"
