"""Socket set-up and batched receive, shared by the broker, controller, workers and client."""

from __future__ import annotations

import zmq
import zmq.asyncio

from broker.protocol import Limits

# A peer cannot make us buffer a frame past this many times the protocol limit: ZeroMQ drops the
# connection instead. Below it, an oversize message is read and refused with a typed error.
HARD_LIMIT_FACTOR = 1
HWM = 10_000


def configure(sock: zmq.Socket, limits: Limits | None = None, *, mandatory: bool = False) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    if limits is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes * HARD_LIMIT_FACTOR)
    if mandatory:
        # an unroutable reply raises EHOSTUNREACH instead of vanishing
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)


async def recv_batch(
    sock: zmq.asyncio.Socket, most: int = 256, most_bytes: int = 32 * 1024 * 1024
) -> list[list[bytes]]:
    """Await one message, then take whatever else is already queued without blocking, up to
    `most` messages or `most_bytes` bytes (what is left stays in ZeroMQ's bounded queue).

    Awaiting each message costs an event-loop round trip; draining the ready ones amortises it.
    """
    out = [await sock.recv_multipart()]
    size = sum(len(f) for f in out[0])
    while len(out) < most and size < most_bytes:
        try:
            out.append(await sock.recv_multipart(flags=zmq.NOBLOCK))
        except zmq.Again:
            break
        size += sum(len(f) for f in out[-1])
    return out


def send(sock: zmq.asyncio.Socket, frames: list) -> bool:
    """Send now or not at all: False when the peer is gone (ROUTER_MANDATORY) or its queue full.

    Used where blocking would stall every other peer (a ROUTER serving many clients); the
    caller decides what an undelivered message means.
    """
    fut = sock.send_multipart(frames, flags=zmq.DONTWAIT, copy=False)
    return not fut.done() or fut.exception() is None
