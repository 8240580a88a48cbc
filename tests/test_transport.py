"""The shared receive-decode-dispatch step and the heartbeat policy, without sockets."""

from __future__ import annotations

import logging

import pytest
import zmq

from wire.protocol import Code, Kind, Limits, Message, ProtocolError, decode, encode
from wire.transport import Heartbeat, Peer, dispatch, drain

LOG = logging.getLogger("test")


def run(frames: list, handlers: dict) -> tuple[list, list]:
    answered: list = []
    refused: list = []
    dispatch(
        Peer(b"p"),
        frames,
        Limits(),
        handlers,
        frozenset(handlers),
        lambda peer, f: answered.append((peer.ident, decode(f, Limits()))),
        lambda peer, e: refused.append(e.code),
        LOG,
    )
    return answered, refused


def test_a_message_goes_to_its_kinds_handler_with_its_ref() -> None:
    got: list[Message] = []
    answered, refused = run(encode(Kind.PING, {"ref": 7}), {Kind.PING: lambda p, m: got.append(m)})
    assert [m.body for m in got] == [{"ref": 7}] and not answered and not refused


def test_refusals_are_answered_with_a_typed_error_naming_the_ref() -> None:
    def picky(peer: Peer, msg: Message) -> None:
        raise ProtocolError(Code.BAD_FIELD, "no")

    # a kind no handler takes is refused by decode; a handler's refusal the same way
    answered, refused = run(encode(Kind.STATUS, {"ref": 1}), {Kind.PING: picky})
    assert answered[0][1].body["code"] == "unknown_kind" and answered[0][1].body["ref"] == 1
    answered, refused = run(encode(Kind.PING, {"ref": 2}), {Kind.PING: picky})
    assert answered[0][1].body == {"code": "bad_field", "message": "no", "ref": 2}
    assert refused == ["bad_field"]


def test_a_handlers_bug_is_answered_internal_and_the_loop_goes_on() -> None:
    answered, _ = run(encode(Kind.PING), {Kind.PING: lambda p, m: 1 / 0})
    assert answered[0][1].body["code"] == "internal"


def test_drain_dispatches_what_is_queued_without_blocking() -> None:
    # the synchronous loop's step (a worker's): the same dispatch, up to `most` at a time
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        pull.bind("inproc://drain")
        push.connect("inproc://drain")
        for frames in (encode(Kind.PING, {"ref": 1}), [b"\xc1"], encode(Kind.PING, {"ref": 3})):
            push.send_multipart(frames)
        while not pull.poll(1000):  # bounded: inproc delivers at once
            pass
        got: list = []
        refused: list = []
        handlers = {Kind.PING: lambda p, m: got.append(m.body["ref"])}
        on_refused = lambda p, e: refused.append(e.code)  # noqa: E731
        assert drain(pull, Limits(), handlers, most=1, refused=on_refused) == 1
        assert drain(pull, Limits(), handlers, refused=on_refused) == 2
        assert drain(pull, Limits(), handlers, refused=on_refused) == 0  # nothing left: no wait
        assert got == [1, 3] and refused == ["malformed"]
    finally:
        ctx.destroy(linger=0)


def test_heartbeat_due_silent_and_stalled() -> None:
    policy = Heartbeat(1.0, 10.0)
    pulse = policy.pulse(100.0)
    assert pulse.due(100.0)
    pulse.beat(100.0)
    assert not pulse.due(100.5) and pulse.due(101.0)
    assert not pulse.silent(110.0) and pulse.silent(110.1)
    pulse.hear(109.0)
    assert not pulse.silent(110.1) and pulse.quiet_s(110.0) == 1.0
    assert policy.stalled(5.1) and not policy.stalled(4.9)
    with pytest.raises(ValueError):
        Heartbeat(2.0, 1.0)
