"""One line of an OpenAI batch file, in and out: an input line read into the jobs of its route
(by broker/openai_api.py's parsing, exactly as the HTTP route reads its body), run on a
baton.client.Client, and the route's response written as a line of OpenAI's batch output
(`id`, `custom_id`, `response: {status_code, request_id, body}`, `error`).

Shared by the gateway's Batch API (broker/batches.py) and `baton batch` (baton/batch.py); both
stream a file through a `Window`, a bounded number of lines in flight whose outcomes come back in
input order (so what is written is always a prefix of the input: that is what makes resuming
from a recorded position sound).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from baton.client import RETRY_ON, Client, Result, failure, prompt_job
from broker import openai_api as api
from broker.completion import Event, completion, until_stop
from broker.openai_api import ApiError, CompletionRequest, EmbeddingRequest
from broker.texts import Texts
from wire.protocol import Code, encodable

URLS = ("/v1/embeddings", "/v1/completions", "/v1/chat/completions")
BATCH_PRIORITY = 1  # interactive HTTP requests are 0: batch lines wait behind them
RETRY_BASE_S, RETRY_CAP_S = 0.05, 5.0  # a busy broker: batch lines wait, they never fail for it
CANCEL_CHUNK = 1024  # ids in one cancel, well under the broker's max_ids_per_message
STOPPED = "the batch stopped before the line could be sent again"
RERUNS = 8  # fresh ids for a streamed line found cancelled: one per run killed before its commit


@dataclass(slots=True)
class Outcome:
    """What one input line came to: the route's response, or `error` for a line that never
    became a request (not JSON, no custom_id, ...). `cancelled`: its jobs were cancelled (a
    cancelled batch leaves such lines out; one that goes on writes them as errors)."""

    custom_id: str | None
    response: dict[str, Any] | None = None  # {"status_code", "request_id", "body"}
    error: dict[str, Any] | None = None  # {"code", "message"}
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return self.response is not None and self.response["status_code"] == 200

    def line(self) -> bytes:
        row = {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": self.custom_id,
            "response": self.response,
            "error": self.error,
        }
        return (json.dumps(row, separators=(",", ":")) + "\n").encode()


@dataclass(slots=True)
class Request:
    """A line read into its route's request and the Baton jobs that answer it."""

    custom_id: str
    request_id: str  # the prefix of its job ids
    jobs: list[dict[str, Any]]
    embedding: EmbeddingRequest | None = None
    completion: CompletionRequest | None = None
    chat: bool = False

    @property
    def streamed(self) -> bool:
        """A completion with stop strings: streamed so that its job ends at the first one."""
        return self.completion is not None and bool(self.completion.stop)


@dataclass(slots=True)
class Line:
    """A line as read from the file: its number, the byte offset just past it, its bytes."""

    number: int
    end: int
    raw: bytes


def lines(src: IO[bytes], number: int = 0, offset: int = 0) -> Iterator[Line]:
    """The non-blank lines of a binary file from `offset` (line `number` is the next one)."""
    src.seek(offset)
    for raw in src:
        offset += len(raw)
        if raw.strip():
            yield Line(number, offset, raw)
            number += 1


def line_error(custom_id: str | None, code: str, message: str) -> Outcome:
    return Outcome(custom_id, error={"code": code, "message": message})


def custom_id_of(raw: bytes) -> tuple[dict[str, Any] | None, str | None, Outcome | None]:
    """The line as a JSON object and its custom_id, or the outcome of a line that has none."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        return None, None, line_error(None, "invalid_json_line", f"the line is not JSON: {e}")
    if not isinstance(obj, dict):
        return None, None, line_error(None, "invalid_json_line", "the line must be a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or not encodable(custom_id):
        why = "'custom_id' must be a non-empty string"
        return obj, None, line_error(None, "invalid_custom_id", why)
    return obj, custom_id, None


def read(
    obj: dict[str, Any], custom_id: str, endpoint: str | None, prefix: str, texts: Texts
) -> Request | Outcome:
    """A line (already known to have a custom_id) as the request of its url; its jobs' ids are
    `prefix:k`. `endpoint`: the one url every line must name (a Batch API batch's), or None."""
    if obj.get("method") != "POST":
        return line_error(custom_id, "invalid_method", "'method' must be \"POST\"")
    url = obj.get("url")
    if url not in URLS:
        return line_error(custom_id, "invalid_url", f"'url' must be one of {', '.join(URLS)}")
    if endpoint is not None and url != endpoint:
        why = f"'url' is {url!r} but the batch's endpoint is {endpoint!r}"
        return line_error(custom_id, "mismatched_url", why)
    body = obj.get("body")
    try:
        if not isinstance(body, dict):
            raise api.bad("'body' must be a JSON object: the request of the url", "body")
        if _strings_not_utf8(body):
            raise api.bad("the body holds a string that is not valid Unicode", "body")
        # the route's own parsing, with the batch's default priority
        body = {"priority": BATCH_PRIORITY, **body}
        if body.get("stream"):
            raise api.bad("'stream' is not supported in a batch", "stream")
        if url == "/v1/embeddings":
            req = api.embedding_request(body)
            jobs = [
                prompt_job("embed", t, model=req.model, priority=req.priority) for t in req.texts
            ]
            return Request(custom_id, prefix, _ids(jobs, prefix), embedding=req)
        if url == "/v1/completions":
            creq = api.completion_request(body)
        else:
            creq, messages = api.chat_request(body)
            creq.prompts = [texts.chat(messages, creq.model)]
        jobs = [_generate_job(p, creq) for p in creq.prompts]
        chat = url == "/v1/chat/completions"
        return Request(custom_id, prefix, _ids(jobs, prefix), completion=creq, chat=chat)
    except ApiError as e:
        return Outcome(custom_id, response=_response(e.status, prefix, e.body()))


@dataclass(slots=True)
class Flight:
    """A line in the window: its task (or its outcome, for a line that needed no job)."""

    line: Line
    task: asyncio.Future[Outcome]
    req: Request | None = None


class Window:
    """Runs requests with at most `size` lines in flight and gives each line's outcome back in
    input order. Leaving early cancels the lines still waiting (their jobs go on at the broker:
    a resumed run gets their results without running them again); `stop()` ends them at the
    broker too.

    A completion line with stop strings is streamed, one job per choice, and its job is
    cancelled as soon as a stop string appears (the gateway's `until_stop`): the text and
    finish_reason are the HTTP route's, and the tokens after the stop are never made."""

    def __init__(self, client: Client, size: int, texts: Texts) -> None:
        self.client = client
        self.size = size
        self.texts = texts
        self.flights: deque[Flight] = deque()
        self.stopped = False

    def job_ids(self) -> list[str]:
        """The jobs of the lines in flight."""
        return [j["id"] for f in self.flights if f.req is not None for j in f.req.jobs]

    async def stop(self) -> None:
        """End the lines in flight (a cancelled or expired batch): their jobs are cancelled at
        the broker and come back `cancelled`, and a line waiting to be sent again gives up.
        Lines that finish anyway keep their answers."""
        self.stopped = True
        ids = self.job_ids()
        for k in range(0, len(ids), CANCEL_CHUNK):
            await cancel(self.client, ids[k : k + CANCEL_CHUNK])

    async def run(
        self, reqs: Iterable[tuple[Line, Request | Outcome]]
    ) -> AsyncIterator[tuple[Line, Outcome]]:
        flights = self.flights
        source = iter(reqs)
        refill = max(1, self.size // 4)  # jobs go in a few large submits, not one per line
        try:
            while True:
                if self.size - len(flights) >= refill or not flights:
                    await self._fill(source)
                if not flights:
                    return
                outcome = await flights[0].task
                yield flights.popleft().line, outcome
        finally:
            for f in flights:
                f.task.cancel()
            flights.clear()

    async def _fill(self, source: Iterator[tuple[Line, Request | Outcome]]) -> None:
        loop = asyncio.get_running_loop()
        new: list[tuple[Line, Request | Outcome]] = []
        while len(self.flights) + len(new) < self.size:
            got = next(source, None)
            if got is None:
                break
            new.append(got)
        # streamed lines send their own jobs: a stream must be watched before its job is sent
        jobs = [j for _, r in new if isinstance(r, Request) and not r.streamed for j in r.jobs]
        futures = iter(await self.client.submit(jobs)) if jobs else iter(())
        for line, req in new:
            if isinstance(req, Outcome):
                done: asyncio.Future[Outcome] = loop.create_future()
                done.set_result(req)
                self.flights.append(Flight(line, done))
                continue
            sent = [] if req.streamed else [next(futures) for _ in req.jobs]
            task = asyncio.ensure_future(self._answer(req, sent))
            self.flights.append(Flight(line, task, req))

    async def _answer(self, req: Request, sent: list[asyncio.Future[Result]]) -> Outcome:
        """Wait for the request's jobs (`sent`: their futures, or streamed here) and answer as
        the route does. TimeoutError when the broker is silent for the client's timeout."""
        if req.streamed:
            # each choice ends at its own first stop string
            choices = [asyncio.ensure_future(self._choice(req, k)) for k in range(len(req.jobs))]
            try:
                ends = list(await asyncio.gather(*choices))
            finally:  # a silent broker (TimeoutError) ends the others' wait too
                for c in choices:
                    c.cancel()
            results = [e.result for e in ends]
        else:
            results = await self._results(req, sent)
        failed = next(((k, r) for k, r in enumerate(results) if r is not None and not r.ok), None)
        if failed is not None:
            k, r = failed
            cancelled = any(r is not None and _code(r) == Code.CANCELLED for r in results)
            where = f"input[{k}]: " if req.embedding is not None and len(results) > 1 else ""
            e = api.job_error(r.error, where)
            return Outcome(
                req.custom_id, _response(e.status, req.request_id, e.body()), None, cancelled
            )
        if req.embedding is not None:
            done = [r for r in results if r is not None]
            tokens = sum(r.tokens for r in done)
            body = api.embedding_response(req.embedding, [r.embedding or [] for r in done], tokens)
            return Outcome(req.custom_id, _response(200, req.request_id, body))
        assert req.completion is not None
        if not req.streamed:
            ends = [
                Event(
                    k,
                    r.text or "",
                    r.finish_reason or "stop",
                    r.prompt_tokens,
                    len(r.token_ids or []),
                )
                for k, r in enumerate(results)
                if r is not None
            ]
        body = completion(req.completion, req.chat, [e.text for e in ends], dict(enumerate(ends)))
        return Outcome(req.custom_id, _response(200, req.request_id, body))

    async def _choice(self, req: Request, k: int) -> Event:
        """Choice k of a streamed completion line: its text to the first stop string (the job
        is cancelled there), or its error as `result`."""
        assert req.completion is not None
        attempt = again = 0
        while True:
            job = req.jobs[k]
            if self.stopped and attempt + again:  # stopped while it waited to go again
                return Event(k, result=failure(job["id"], Code.CANCELLED, STOPPED))
            prompt = job["text"] if "text" in job else job["token_ids"]
            fields = {f: v for f, v in job.items() if f not in ("task", "text", "token_ids")}
            stream = self.client.generate_stream(prompt, **fields)
            text, end = "", Event(k)
            async for e in until_stop(k, stream, self.texts, req.completion.stop, prompt):
                text += e.text
                end = e
            if end.final and end.result is None:  # stopped: the rest would run for no one
                await cancel(self.client, [job["id"]])
            if end.result is not None and not end.result.ok and not self.stopped:
                delay = _retry_delay(end.result, attempt)
                if delay is not None:
                    await asyncio.sleep(delay)  # the broker's hint or a backoff, not a poll
                    attempt += 1
                    continue
                if _code(end.result) == Code.CANCELLED and again < RERUNS:
                    # nobody here cancelled it: an earlier run (killed before its commit) did,
                    # at a stop string, and the broker keeps that end under the id
                    again += 1
                    job["id"] = f"{req.request_id}:{k}.{again}"
                    continue
            end.text = text
            return end

    async def _results(self, req: Request, sent: list[asyncio.Future[Result]]) -> list[Result]:
        """The results of the request's jobs; a refusal that means "not now" (busy, the journal,
        a fleet with no model yet: every refusal with a retry hint) waits for the hint and is
        sent again, so a batch line never fails for it."""
        jobs = req.jobs
        results: list[Result | None] = [None] * len(jobs)
        todo = list(range(len(jobs)))
        attempt = 0
        while todo:
            got = await self.client.results(sent)
            again, delay = [], 0.0
            for k, r in zip(todo, got, strict=True):
                wait = None if r.ok else _retry_delay(r, attempt)
                if wait is None:
                    results[k] = r
                elif self.stopped:  # the batch is over: the line is not sent again
                    results[k] = failure(r.id, Code.CANCELLED, STOPPED)
                else:
                    again.append(k)
                    delay = max(delay, wait)
            todo = again
            if todo:
                await asyncio.sleep(delay)  # the broker's hint or a backoff, not a poll
                attempt += 1
                if self.stopped:  # stopped while it waited: the line is not sent again
                    for k in todo:
                        results[k] = failure(jobs[k]["id"], Code.CANCELLED, STOPPED)
                    break
                sent = await self.client.submit(jobs[k] for k in todo)
        return [r for r in results if r is not None]


async def cancel(client: Client, ids: list[str]) -> None:
    """Cancel jobs at the broker, if it is still there to hear it."""
    with contextlib.suppress(TimeoutError, RuntimeError):  # the broker may be gone
        await client.cancel(ids)


def _retry_delay(r: Result, attempt: int) -> float | None:
    """How long to wait before sending a refused job again, or None when the refusal is final:
    the broker's hint (a refusal carrying one means "not now"), or a growing backoff, jittered
    so that a window does not stampede."""
    error = r.error or {}
    hint = error.get("retry_after_ms")
    if _code(r) not in RETRY_ON and not isinstance(hint, int | float):
        return None
    backoff = min(RETRY_CAP_S, RETRY_BASE_S * 2**attempt)
    seconds = hint / 1000 if isinstance(hint, int | float) else 0.0
    return max(seconds, backoff) * random.uniform(1.0, 1.5)


def _code(r: Result) -> str | None:
    return (r.error or {}).get("code")


def _ids(jobs: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    for k, job in enumerate(jobs):
        job["id"] = f"{prefix}:{k}"
    return jobs


def _generate_job(prompt: str | list[int], req: CompletionRequest) -> dict[str, Any]:
    job: dict[str, Any] = {"task": "generate", "model": req.model, **req.fields}
    job["text" if isinstance(prompt, str) else "token_ids"] = prompt
    return job


def _response(status: int, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"status_code": status, "request_id": request_id, "body": body}


def _strings_not_utf8(value: Any) -> bool:
    """JSON escapes can spell what UTF-8 cannot ("\\ud800"): such a job could not be sent."""
    if isinstance(value, str):
        return not encodable(value)
    if isinstance(value, dict):
        return any(_strings_not_utf8(k) or _strings_not_utf8(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_strings_not_utf8(v) for v in value)
    return False
