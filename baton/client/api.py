"""The asyncio Client: submit jobs, embed texts, generate (whole or streamed), stream jobs
through a window, status, cancel, ping. `async with Client(endpoint) as c: ...`; the blocking wrapper is baton.client.BlockingClient.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

from baton.client.inflight import BUSY_ATTEMPTS, CHUNK, Inflight
from baton.client.link import Link
from baton.client.result import Delta, Result
from wire.protocol import Kind, Limits, Message

Prompt = str | Sequence[int]  # a text, or token ids


class Client:
    """`curve_key` (our secret certificate file) and `server_key` (the broker's public
    certificate file, or its z85 public key) are for a broker that requires keys
    (`endpoints.client_keys`); made by `baton keys`. Without them the connection is plain.
    A job refused as "not now" (busy) is sent again up to `busy_attempts` times after the
    broker's hinted delay; with 0 the refusal is its result (what an HTTP gateway passes on)."""

    def __init__(
        self,
        endpoint: str,
        *,
        limits: Limits | None = None,
        timeout_s: float = 60,
        curve_key: str | Path | None = None,
        server_key: str | Path | bytes | None = None,
        busy_attempts: int = BUSY_ATTEMPTS,
    ) -> None:
        self.endpoint = endpoint
        self.limits = limits or Limits()
        self.timeout_s = timeout_s
        self._link = Link(
            endpoint,
            self.limits,
            timeout_s,
            {Kind.RESULTS: self._on_results, Kind.TOKENS: self._on_tokens},
            curve_key=curve_key,
            server_key=server_key,
        )
        self._inflight = Inflight(self._link, busy_attempts)

    async def __aenter__(self) -> Client:
        self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        self._link.open()

    def close(self) -> None:
        self._link.close()
        self._inflight.close()

    # --- requests ---

    async def submit(self, jobs: Iterable[dict]) -> list[asyncio.Future[Result]]:
        """Send jobs; returns one future per job, resolved when its `results` entry arrives."""
        if not self._link.is_open:
            raise RuntimeError("client is not open; use `async with Client(...)`")
        return await self._inflight.submit(jobs)

    async def results(self, futures: list[asyncio.Future[Result]]) -> list[Result]:
        """The results of submitted jobs, in order; TimeoutError when none arrives for
        timeout_s (a steady trickle of results never times out)."""
        await self._progress(set(futures))
        return [f.result() for f in futures]

    async def embed(
        self, inputs: Iterable[Prompt], task: str = "embed", **fields: Any
    ) -> list[Result]:
        """Embed each input (a text, or the model's token ids taken as the whole input, special
        tokens as given); returns the results in order. `fields` go into every job: model,
        deadline_ms, priority (docs/protocol.md)."""
        return await self.results(await self.submit(prompt_job(task, p, **fields) for p in inputs))

    async def generate(self, prompts: Iterable[Prompt], **fields: Any) -> list[Result]:
        """Generate for each prompt (a text, or a list of token ids); returns the results in
        order. `fields` go into every job: max_new_tokens, temperature, top_k, top_p, seed,
        ignore_eos, stop_token_ids, model, deadline_ms (docs/protocol.md)."""
        return await self.results(await self.submit(generate_job(p, **fields) for p in prompts))

    async def generate_stream(self, prompt: Prompt, **fields: Any) -> AsyncIterator[Delta]:
        """Generate for one prompt, yielding the tokens as the model makes them.

        Each Delta holds new tokens only (what repeats tokens already yielded, e.g. after the
        job restarted on another controller, is dropped); the last one carries the job's
        `result` (ok, an error, or cancelled by `cancel([delta.id])`) and the stream ends with
        it. The job's id is `fields["id"]` when given. Leaving the loop early does not cancel
        the job. TimeoutError when neither a token nor the result comes for timeout_s.
        """
        job = generate_job(prompt, **fields)
        job_id = job.setdefault("id", uuid.uuid4().hex)
        queue: asyncio.Queue[Delta | asyncio.Future[Result]] = asyncio.Queue()
        self._inflight.watch(job_id, queue)
        try:
            [fut] = await self.submit([job])
            fut.add_done_callback(queue.put_nowait)  # the end comes through the same queue
            yielded = 0  # tokens yielded so far: the next delta must start here
            while True:
                try:
                    async with asyncio.timeout(self.timeout_s):
                        item = await queue.get()
                except TimeoutError:
                    raise TimeoutError(
                        f"no token nor result for job {job_id} from the broker at "
                        f"{self.endpoint} within {self.timeout_s:g} s"
                    ) from None
                if isinstance(item, asyncio.Future):
                    result = item.result()
                    rest = result.token_ids[yielded:] if result.ok and result.token_ids else []
                    yield Delta(job_id, yielded, rest, result)
                    return
                # past what we have: deltas were lost (a slow reader's were dropped); the final
                # result brings them, so the tokens yielded stay a prefix of the output
                if item.index > yielded:
                    continue
                new = item.token_ids[yielded - item.index :]
                if new:
                    yield Delta(job_id, yielded, new)
                    yielded += len(new)
        finally:
            self._inflight.unwatch(job_id, queue)

    async def run(
        self, jobs: AsyncIterable[dict] | Iterable[dict], window: int = 512
    ) -> AsyncIterator[Result]:
        """Stream jobs through with at most `window` outstanding; yields results as they finish."""
        source = _aiter(jobs)
        # top up in chunks, not one job per finished result
        refill = max(1, min(CHUNK, window // 4))
        pending: set[asyncio.Future[Result]] = set()
        exhausted = False
        while True:
            free = window - len(pending)
            if not exhausted and (free >= refill or not pending):
                batch = []
                while len(batch) < free:
                    try:
                        batch.append(await anext(source))
                    except StopAsyncIteration:
                        exhausted = True
                        break
                if batch:
                    pending.update(await self.submit(batch))
            if not pending:
                return
            done, pending = await self._progress(pending, first=True)
            for fut in done:
                yield fut.result()

    async def status(self) -> dict:
        return (await self._link.request(Kind.STATUS)).body

    async def cancel(self, ids: list[str]) -> dict:
        body = (await self._link.request(Kind.CANCEL, {"ids": list(ids)})).body
        return {"ids": body.get("ids", []), "unknown": body.get("unknown", [])}

    async def ping(self) -> float:
        """Round-trip seconds."""
        t0 = time.perf_counter()
        await self._link.request(Kind.PING)
        return time.perf_counter() - t0

    # --- internals ---

    def _on_results(self, msg: Message) -> None:
        self._inflight.results(msg)

    def _on_tokens(self, msg: Message) -> None:
        self._inflight.tokens(msg)

    async def _progress(
        self, pending: set[asyncio.Future[Result]], first: bool = False
    ) -> tuple[set, set]:
        """Wait for results; time out only when none arrives for timeout_s."""
        done: set = set()
        while pending:
            got, pending = await asyncio.wait(
                pending, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if not got:
                raise TimeoutError(
                    f"{len(pending)} jobs outstanding and no result from the broker at "
                    f"{self.endpoint} within {self.timeout_s:g} s"
                )
            done |= got
            if first:
                break
        return done, pending


def generate_job(prompt: Prompt, **fields: Any) -> dict[str, Any]:
    """A generate job for `submit`: the prompt as `text` (a str) or `token_ids`, plus fields."""
    return prompt_job("generate", prompt, **fields)


def prompt_job(task: str, prompt: Prompt, **fields: Any) -> dict[str, Any]:
    """A job for `submit` whose input is `text` (a str) or `token_ids`, plus fields."""
    job: dict[str, Any] = {"task": task, **fields}
    if isinstance(prompt, str):
        job["text"] = prompt
    else:
        job["token_ids"] = list(prompt)
    return job


async def _aiter(items: AsyncIterable[dict] | Iterable[dict]) -> AsyncIterator[dict]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
