"""Client without async: a private event loop runs the asyncio Client for each call."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from baton.client.api import Client
from baton.client.result import Result
from wire.protocol import Limits


class BlockingClient:
    """Client without async: owns a private event loop. `with BlockingClient(ep) as c: ...`"""

    def __init__(
        self,
        endpoint: str,
        *,
        limits: Limits | None = None,
        timeout_s: float = 60,
        curve_key: str | Path | None = None,
        server_key: str | Path | bytes | None = None,
    ) -> None:
        self._client = Client(
            endpoint,
            limits=limits,
            timeout_s=timeout_s,
            curve_key=curve_key,
            server_key=server_key,
        )
        self._loop = asyncio.new_event_loop()

    def __enter__(self) -> BlockingClient:
        self._loop.run_until_complete(self._open())
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _open(self) -> None:
        self._client.open()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._client.close()
        # let the cancelled reader and retry tasks unwind before the loop goes
        pending = asyncio.all_tasks(self._loop)
        if pending:
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def submit(self, jobs: Iterable[dict]) -> list[Result]:
        """Blocking: returns the results, not futures (nothing would run the loop for them)."""

        async def go() -> list[Result]:
            return await self._client.results(await self._client.submit(jobs))

        return self._loop.run_until_complete(go())

    def embed(
        self, inputs: Iterable[str | Sequence[int]], task: str = "embed", **fields: Any
    ) -> list[Result]:
        """Client.embed, blocking: one result per input (a text or token ids), in order."""
        return self._loop.run_until_complete(self._client.embed(inputs, task, **fields))

    def generate(self, prompts: Iterable[str | Sequence[int]], **fields: Any) -> list[Result]:
        """Client.generate, blocking: one result per prompt, in order."""
        return self._loop.run_until_complete(self._client.generate(prompts, **fields))

    def run(self, jobs: Iterable[dict], window: int = 512) -> Iterator[Result]:
        stream = self._client.run(jobs, window)
        try:
            while True:
                try:
                    yield self._loop.run_until_complete(anext(stream))
                except StopAsyncIteration:
                    return
        finally:
            self._loop.run_until_complete(stream.aclose())

    def status(self) -> dict:
        return self._loop.run_until_complete(self._client.status())

    def cancel(self, ids: list[str]) -> dict:
        return self._loop.run_until_complete(self._client.cancel(ids))

    def ping(self) -> float:
        return self._loop.run_until_complete(self._client.ping())
