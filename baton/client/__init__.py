"""Client side of the client <-> broker protocol.

- `api.Client`: the asyncio client (submit, embed, generate, generate_stream, run, status,
  cancel, ping).
- `blocking.BlockingClient`: the same without async, on a private event loop.
- `result.Result`: what a job comes to; `result.Delta`: a step of a generate stream.
- `link.Link`: the connection (one DEALER, a background reader, replies matched by ref).
- `inflight.Inflight`: jobs sent and awaited by id, chunking, busy retries.
"""

from baton.client.api import Client, generate_job, prompt_job
from baton.client.blocking import BlockingClient
from baton.client.inflight import BUSY_ATTEMPTS, BUSY_BASE_S, BUSY_CAP_S, CHUNK, RETRY_ON
from baton.client.result import Delta, Result, failure

__all__ = [
    "BUSY_ATTEMPTS",
    "BUSY_BASE_S",
    "BUSY_CAP_S",
    "CHUNK",
    "RETRY_ON",
    "BlockingClient",
    "Client",
    "Delta",
    "Result",
    "failure",
    "generate_job",
    "prompt_job",
]
