"""The client's connection to the broker: one DEALER socket and a background reader.

Direct replies (accepted, status, cancelled, pong, error) are matched by the `ref` put on each
request; every other kind the broker sends (`results`, ...) goes to the handler the owner gives
for it. A reply that never comes is bounded by `timeout_s`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import zmq
import zmq.asyncio

from wire.protocol import Code, Kind, Limits, Message, ProtocolError, encode
from wire.transport import Peer, client_keys, serve

log = logging.getLogger("baton.client")

REPLY_KINDS = frozenset({Kind.ACCEPTED, Kind.STATUS, Kind.CANCELLED, Kind.PONG, Kind.ERROR})


class Link:
    def __init__(
        self,
        endpoint: str,
        limits: Limits,
        timeout_s: float,
        handlers: Mapping[str, Callable[[Message], None]],
        *,
        curve_key: str | Path | None = None,
        server_key: str | Path | bytes | None = None,
    ) -> None:
        if (curve_key is None) != (server_key is None):
            raise ValueError("curve_key and server_key go together: give both or neither")
        self.endpoint, self.limits, self.timeout_s = endpoint, limits, timeout_s
        self.curve_key, self.server_key = curve_key, server_key
        self.handlers = handlers
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None
        self._refs = itertools.count(1)
        self._replies: dict[int, asyncio.Future[Message]] = {}

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    def open(self) -> None:
        if self._sock is not None:
            return
        # a private context: nothing global is created or shared
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        self._sock.setsockopt(zmq.MAXMSGSIZE, 4 * self.limits.max_message_bytes)
        if self.curve_key is not None and self.server_key is not None:
            server = self.server_key if isinstance(self.server_key, bytes) else str(self.server_key)
            client_keys(self._sock, str(self.curve_key), server)
        self._sock.connect(self.endpoint)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        for fut in self._replies.values():
            fut.cancel()
        self._replies.clear()
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    async def request(self, kind: Kind, body: dict | None = None, *, check: bool = True) -> Message:
        """Send one request and await its reply (matched by ref); an `error` reply raises its
        ProtocolError unless `check` is False."""
        if self._sock is None:
            raise RuntimeError("client is not open; use `async with Client(...)`")
        ref = next(self._refs)
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._replies[ref] = fut
        try:
            await self._sock.send_multipart(encode(kind, {**(body or {}), "ref": ref}))
            try:
                async with asyncio.timeout(self.timeout_s):
                    reply = await fut
            except TimeoutError:
                raise TimeoutError(
                    f"no reply to {kind} from the broker at {self.endpoint} "
                    f"within {self.timeout_s:g} s"
                ) from None
        finally:
            self._replies.pop(ref, None)
        if check and reply.kind == Kind.ERROR:
            raise refusal(reply.body)
        return reply

    async def _read(self) -> None:
        assert self._sock is not None
        handlers = {kind: _unpeered(h) for kind, h in self.handlers.items()}
        # a message that cannot be decoded has nothing sane to route it to: it is dropped, and
        # the waiter's timeout bounds the loss
        await serve(
            self._sock,
            self.limits,
            {**handlers, **dict.fromkeys(REPLY_KINDS, self._reply)},
            log=log,
        )

    def _reply(self, _peer: Peer, msg: Message) -> None:
        ref = msg.body.pop("ref", None)
        fut = self._replies.get(ref) if isinstance(ref, int) else None
        if fut is not None and not fut.done():
            fut.set_result(msg)


def _unpeered(handler: Callable[[Message], None]) -> Callable[[Peer, Message], None]:
    # a DEALER has one peer, the broker: its handlers need only the message
    return lambda _peer, msg: handler(msg)


def refusal(body: dict) -> ProtocolError:
    """An `error` reply as the ProtocolError it stands for."""
    try:
        code = Code(body.get("code"))
    except ValueError:
        code = Code.INTERNAL
    return ProtocolError(code, str(body.get("message", "")))
