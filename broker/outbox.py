"""Messages to clients that their connection cannot take yet: kept per client, bounded in bytes.

The front socket's high-water mark is low, so ZeroMQ holds little for a client that does not
read. What it cannot take waits here in order (so an `accepted` never overtakes nothing and a
result never jumps its queue) and is sent as the client reads. Past `most_bytes` for one client
the oldest waiting messages are dropped: results stay in the journal, and the client gets them by
submitting their ids again. A client that has left is found out on the next send
(ROUTER_MANDATORY: EHOSTUNREACH) and everything waiting for it is forgotten.
"""

from __future__ import annotations

import logging
from collections import deque

import zmq
import zmq.asyncio

log = logging.getLogger("baton.broker")


class Outbox:
    def __init__(self, sock: zmq.asyncio.Socket, most_bytes: int) -> None:
        self.sock, self.most_bytes = sock, most_bytes
        self.waiting: dict[bytes, deque[list]] = {}
        self.sizes: dict[bytes, int] = {}
        self.dropped = 0  # messages dropped for clients that did not read

    def send(self, ident: bytes, frames: list) -> None:
        """Send to one client now, or queue it behind what already waits for that client."""
        queue = self.waiting.get(ident)
        if queue is None:
            outcome = self._try(ident, frames)
            if outcome != zmq.EAGAIN:
                return  # sent, or the client is gone
            queue = self.waiting[ident] = deque()
            self.sizes[ident] = 0
        queue.append(frames)
        self.sizes[ident] += _size(frames)
        while self.sizes[ident] > self.most_bytes and len(queue) > 1:
            self.sizes[ident] -= _size(queue.popleft())
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning("client %r does not read; %d messages dropped", ident, self.dropped)

    def flush(self) -> None:
        """Send what waits, as far as each client's connection takes it."""
        for ident in list(self.waiting):
            queue = self.waiting[ident]
            while queue:
                outcome = self._try(ident, queue[0])
                if outcome == zmq.EAGAIN:
                    break
                self.sizes[ident] -= _size(queue.popleft())
                if outcome == zmq.EHOSTUNREACH:
                    queue.clear()  # it has left: nothing more goes to it
            if not queue:
                del self.waiting[ident], self.sizes[ident]

    def bytes(self) -> int:
        return sum(self.sizes.values())

    def _try(self, ident: bytes, frames: list) -> int:
        """0 when sent; zmq.EAGAIN when the client's pipe is full; zmq.EHOSTUNREACH when gone."""
        fut = self.sock.send_multipart([ident, *frames], flags=zmq.DONTWAIT, copy=False)
        if not fut.done() or fut.exception() is None:
            return 0
        e = fut.exception()
        return e.errno if isinstance(e, zmq.ZMQError) else zmq.EHOSTUNREACH


def _size(frames: list) -> int:
    return sum(len(f) for f in frames)
