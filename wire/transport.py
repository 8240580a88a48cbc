"""Socket set-up, batched receive, the receive-decode-dispatch loop and the heartbeat policy,
shared by the broker, controller, workers and client."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from wire.protocol import Code, Limits, Message, ProtocolError, decode, error

HWM = 10_000
TIMER_SLACK_S = 0.001


def configure(sock: zmq.Socket, limits: Limits | None = None, *, mandatory: bool = False) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    if limits is not None:
        # no frame may exceed what a whole message may hold: ZeroMQ drops a peer sending one
        # before buffering it; messages whose frames each fit are read and refused by size
        sock.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes)
    if mandatory:
        # an unroutable reply raises EHOSTUNREACH instead of vanishing
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)


async def recv_batch(
    sock: zmq.asyncio.Socket,
    most: int = 256,
    most_bytes: int = 32 * 1024 * 1024,
    copy: bool = True,
) -> list[list]:
    """Await one message, then take whatever else is already queued without blocking, up to
    `most` messages or `most_bytes` bytes (what is left stays in ZeroMQ's bounded queue).
    `copy=False` gives zmq.Frames, which carry the connection's metadata.

    Awaiting each message costs an event-loop round trip; draining the ready ones amortises it.
    """
    out = [await sock.recv_multipart(copy=copy)]
    size = sum(len(f) for f in out[0])
    while len(out) < most and size < most_bytes:
        try:
            out.append(await sock.recv_multipart(flags=zmq.NOBLOCK, copy=copy))
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


async def recv_batch_from(sock: zmq.asyncio.Socket) -> list[tuple[list[bytes], str | None]]:
    """recv_batch for a socket behind ZAP: each message with the User-Id its connection
    authenticated as (a CURVE client's z85 public key; None where no ZAP handler ran). Only
    keyed sockets pay for receiving zmq.Frames."""

    def owned(frames: list[zmq.Frame]) -> tuple[list[bytes], str | None]:
        try:
            user = frames[-1].get("User-Id")
        except zmq.ZMQError:  # no such property: the connection was not authenticated
            user = None
        return [f.bytes for f in frames], user or None

    return [owned(frames) for frames in await recv_batch(sock, copy=False)]


@dataclass(frozen=True, slots=True)
class Peer:
    """Who sent a message: its ROUTER identity (b"" on a DEALER, where there is one peer) and
    the CURVE key its connection authenticated as (None where no ZAP handler ran)."""

    ident: bytes = b""
    user: str | None = None


Handler = Callable[[Peer, Message], Any]


async def serve(
    sock: zmq.asyncio.Socket,
    limits: Limits,
    handlers: Mapping[str, Handler],
    *,
    routed: bool = False,
    keyed: bool = False,
    answer: Callable[[Peer, list], Any] | None = None,
    refused: Callable[[Peer, ProtocolError], Any] | None = None,
    before: Callable[[], Any] | None = None,
    log: logging.Logger | None = None,
) -> NoReturn:
    """Receive, decode and dispatch messages on `sock` until cancelled.

    Each round takes a bounded batch (`recv_batch`), decodes every message under `limits`
    accepting only the kinds `handlers` names, and calls `handlers[kind](peer, msg)` in
    arrival order. `msg.body` still holds the sender's `ref`, if any.

    - `routed`: a ROUTER; the first frame is the sender's identity (`peer.ident`).
    - `keyed`: the socket is behind ZAP (CURVE); `peer.user` is the key it authenticated as.
    - `answer(peer, frames)`: how to reply to a peer. Given it, a ProtocolError (from decode
      or raised by a handler) is answered with a typed `error` naming the request's ref, and
      any other exception a handler raises with `internal`; without it nothing is answered.
    - `refused(peer, e)`: called for every ProtocolError (after the answer, if any), e.g. to
      log it or to drop a peer that sent what cannot be read.
    - `before()`: called before each receive (e.g. to flush replies a peer can take again).

    A handler's unexpected exception is logged and does not stop the loop: one bad message
    must not take a door down for everyone else.
    """
    log = log or logging.getLogger("baton.wire")
    kinds = frozenset(handlers)
    while True:
        if before is not None:
            before()
        if keyed:
            got = await recv_batch_from(sock)
        else:
            got = [(frames, None) for frames in await recv_batch(sock)]
        for frames, user in got:
            peer = Peer(frames[0], user) if routed else Peer(b"", user)
            dispatch(
                peer,
                frames[1:] if routed else frames,
                limits,
                handlers,
                kinds,
                answer,
                refused,
                log,
            )


def drain(
    sock: zmq.Socket,
    limits: Limits,
    handlers: Mapping[str, Handler],
    *,
    most: int = 256,
    refused: Callable[[Peer, ProtocolError], Any] | None = None,
    log: logging.Logger | None = None,
) -> int:
    """One round of `serve` for a loop that cannot await (a worker running torch between its
    polls): decode and dispatch, in arrival order, up to `most` messages already queued on the
    synchronous DEALER or PULL `sock`, without blocking. Returns how many were taken; the rest
    stay queued for the caller's next poll. Refusals go to `refused`, as in `serve`."""
    log = log or logging.getLogger("baton.wire")
    kinds = frozenset(handlers)
    taken = 0
    while taken < most:
        try:
            frames = sock.recv_multipart(flags=zmq.NOBLOCK)
        except zmq.Again:
            break
        taken += 1
        dispatch(Peer(), frames, limits, handlers, kinds, None, refused, log)
    return taken


def dispatch(
    peer: Peer,
    frames: list,
    limits: Limits,
    handlers: Mapping[str, Handler],
    kinds: frozenset[str],
    answer: Callable[[Peer, list], Any] | None,
    refused: Callable[[Peer, ProtocolError], Any] | None,
    log: logging.Logger,
) -> None:
    """One message of `serve` or `drain`: decode, call its handler, answer what went wrong."""
    msg = None
    try:
        msg = decode(frames, limits, kinds)
        handlers[msg.kind](peer, msg)
    except ProtocolError as e:
        if answer is not None:
            # the reply names the request it refuses, whether decode or a handler refused
            ref = e.ref if msg is None else msg.body.get("ref")
            answer(peer, error(e.code, e.message, ref=ref))
        if refused is not None:
            refused(peer, e)
    except Exception as e:
        log.exception("%s message failed", msg.kind if msg is not None else "a")
        if answer is not None:
            answer(peer, error(Code.INTERNAL, f"{type(e).__name__}: {e}"))


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One heartbeat policy for a link: send every `period_s`; a peer silent (no traffic of any
    kind) for `dead_after_s` is presumed dead. Each peer's clocks are a `Pulse` (`pulse()`)."""

    period_s: float = 1.0
    dead_after_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.period_s < self.dead_after_s:
            raise ValueError(
                f"heartbeat period {self.period_s} s must be positive and under "
                f"dead_after {self.dead_after_s} s"
            )

    def pulse(self, now: float) -> Pulse:
        """A peer first heard at `now` (monotonic seconds)."""
        return Pulse(self, now)

    def stalled(self, gap_s: float) -> bool:
        """Whether a gap of `gap_s` between our own ticks means we ourselves were stopped
        (SIGSTOP, swapped out, a blocked loop): the peers' silence is then ours, not theirs."""
        return gap_s > max(3 * self.period_s, self.dead_after_s / 2)


@dataclass(slots=True)
class Pulse:
    """One peer's liveness under a Heartbeat policy, in monotonic seconds."""

    policy: Heartbeat
    heard: float  # last traffic from the peer
    sent: float = field(default=-math.inf)  # last heartbeat we sent it

    def hear(self, now: float) -> None:
        """Any traffic from the peer is a heartbeat."""
        self.heard = now

    def due(self, now: float) -> bool:
        """Whether our next heartbeat to the peer is due; call `beat(now)` once it is sent."""
        # a timer may fire a clock tick early: that must not skip a whole period
        return now - self.sent >= self.policy.period_s - TIMER_SLACK_S

    def beat(self, now: float) -> None:
        self.sent = now

    def silent(self, now: float) -> bool:
        """Whether the peer has been silent past `dead_after_s`: presume it dead."""
        return now - self.heard > self.policy.dead_after_s

    def quiet_s(self, now: float) -> float:
        return now - self.heard


def _key_pair(secret_cert: str) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(secret_cert)
    if secret is None:
        raise ValueError(f"{secret_cert} holds no secret key (use the .key_secret file)")
    return public, secret


def curve_server(sock: zmq.Socket, secret_cert: str) -> None:
    """Make `sock` a CURVE server with the key pair in `secret_cert` (made by `baton keys`).

    Call before bind. Clients must then know the matching public key, and the context's ZAP
    handler (see `authenticator`) decides which client keys get in.
    """
    sock.curve_publickey, sock.curve_secretkey = _key_pair(secret_cert)
    sock.curve_server = True


def authenticator(
    ctx: zmq.asyncio.Context, client_keys: str, also: Iterable[bytes] = ()
) -> AsyncioAuthenticator:
    """A ZAP handler on `ctx` that lets in only CURVE clients whose public certificate is in
    the directory `client_keys` (read now: restart to change the set), or whose z85 public key
    is in `also`. Needs a running loop."""
    keys = zmq.auth.load_certificates(client_keys)  # raises here, where configure_curve logs
    auth = AsyncioAuthenticator(ctx, log=logging.getLogger("baton.auth"))
    auth.start()
    auth.configure_curve(domain="*", location=client_keys)
    for key in also:  # pyzmq's own table of allowed keys, as configure_curve fills it
        auth.certs["*"][key] = True
    if not keys:
        logging.getLogger("baton.auth").warning(
            "%s holds no client keys: nobody gets in", client_keys
        )
    return auth


def client_keys(sock: zmq.Socket, secret_cert: str, server_public: str | bytes) -> None:
    """Make `sock` a CURVE client: our key pair from `secret_cert`, the server's public key
    from a certificate file or as z85 bytes. Call before connect."""
    sock.curve_publickey, sock.curve_secretkey = _key_pair(secret_cert)
    if isinstance(server_public, bytes):
        server = server_public
    else:
        server, _ = zmq.auth.load_certificate(server_public)
    sock.curve_serverkey = server
