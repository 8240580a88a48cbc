"""Fixtures shared by the fleet-level tests: real `baton up` processes on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import zmq

from baton.launch import Fleet

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "minilm.toml"


@contextmanager
def dealer(endpoint: str) -> Iterator[zmq.Socket]:
    """A raw DEALER on the client endpoint, for speaking (or mangling) the protocol by hand."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(endpoint)
    try:
        yield s
    finally:
        s.close(0)
        ctx.term()


def start(*sets: str, gateway: bool = False) -> Fleet:
    # one torch thread per worker: 2 busy cores must not be oversubscribed by 4 workers
    return Fleet(CONFIG, ["workers.threads=1", *sets], ready_timeout_s=240, gateway=gateway).start()


@pytest.fixture(scope="session")
def small_fleet() -> Iterator[Fleet]:
    """tensor 1 x pipeline 1, with limits low enough to hit from a test. The batch budget is one
    whose largest output (128 two-token texts: [128, 384] float32) fits the message limit. With
    the HTTP gateway (tests/test_gateway.py), whose body limit is low enough to hit too."""
    fleet = start(
        "limits.max_text_chars=20000",
        "limits.max_message_bytes=200000",
        "batching.max_batch_tokens=256",
        "limits.max_queued=64",
        "gateway.max_body_bytes=100000",
        gateway=True,
    )
    try:
        yield fleet
    finally:
        fleet.stop()
