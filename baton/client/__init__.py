"""Client side of the client <-> broker protocol.

- `api.Client`: the asyncio client (submit, embed, run, status, cancel, ping).
- `blocking.BlockingClient`: the same without async, on a private event loop.
- `result.Result`: what a job comes to.
- `link.Link`: the connection (one DEALER, a background reader, replies matched by ref).
- `inflight.Inflight`: jobs sent and awaited by id, chunking, busy retries.
"""

from baton.client.api import Client
from baton.client.blocking import BlockingClient
from baton.client.inflight import BUSY_ATTEMPTS, BUSY_BASE_S, BUSY_CAP_S, CHUNK, RETRY_ON
from baton.client.result import Result, failure

__all__ = [
    "BUSY_ATTEMPTS",
    "BUSY_BASE_S",
    "BUSY_CAP_S",
    "CHUNK",
    "RETRY_ON",
    "BlockingClient",
    "Client",
    "Result",
    "failure",
]
