"""Socket set-up and batched receive, shared by the broker, controller, workers and client."""

from __future__ import annotations

import logging

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from wire.protocol import Limits

HWM = 10_000


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


def authenticator(ctx: zmq.asyncio.Context, client_keys: str) -> AsyncioAuthenticator:
    """A ZAP handler on `ctx` that lets in only CURVE clients whose public certificate is in
    the directory `client_keys` (read now: restart to change the set). Needs a running loop."""
    keys = zmq.auth.load_certificates(client_keys)  # raises here, where configure_curve logs
    auth = AsyncioAuthenticator(ctx, log=logging.getLogger("baton.auth"))
    auth.start()
    auth.configure_curve(domain="*", location=client_keys)
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
