"""The HTTP gateway: OpenAI's routes over Baton's client endpoint, in a process of its own.

`baton up` binds the listening socket (so a refusal comes before anything starts), hands it to
this process and passes the config on stdin (bearer keys never go on a command line). Here an
aiohttp server on uvloop answers `/v1/embeddings`, `/v1/completions`, `/v1/chat/completions`
(when the model ships a chat template), `/v1/models`, `/health`, `/metrics` and the Batch API
(broker/batch_api.py, `--batch-dir`), and talks to the
broker as one more client (baton.client, one DEALER for every HTTP request). Its own process
means a slow HTTP client or a large JSON body never stalls the broker's ZeroMQ loop.

Run by broker/gateway_process.py: `python -m broker.gateway --broker ENDPOINT --fd N
[--model-dir DIR] [--tokenizer FILE] [--batch-dir DIR]` with the config JSON on stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import math
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web

from baton.client import Client, Delta, prompt_job
from broker import openai_api as api
from broker.completion import Event, chunk, chunk_head, completion, until_stop
from broker.metrics import Metrics
from broker.openai_api import ApiError, CompletionRequest
from broker.texts import Texts
from controller.config import Config, from_dict

log = logging.getLogger("baton.gateway")

SHUTDOWN_S = 30.0  # in-flight HTTP requests get this long to finish at stop
STATUS_TIMEOUT_S = 5.0  # a broker silent this long is not healthy
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Gateway:
    def __init__(self, cfg: Config, client: Client, texts: Texts, keys: list[str]) -> None:
        self.cfg = cfg
        self.client = client
        self.texts = texts
        self.keys = [k.encode() for k in keys]
        self.metrics = Metrics()
        self.chores: set[asyncio.Task] = set()  # cancels of abandoned jobs

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._errors, self._auth],
            client_max_size=self.cfg.gateway.max_body_bytes,
        )
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.scrape)
        return app

    # --- middlewares ---

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every error in OpenAI's shape, aiohttp's own (404, 405, 413) included."""
        try:
            return await handler(request)
        except ApiError as e:
            return answer(e)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            kind = "invalid_request_error" if e.status < 500 else "server_error"
            return answer(ApiError(e.status, e.text or e.reason, kind, code=str(e.status)))
        except TimeoutError as e:
            return answer(ApiError(504, str(e), "server_error", code="timeout"))
        except (ConnectionResetError, asyncio.CancelledError):
            raise  # the client left: there is no one to answer
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return answer(ApiError(500, "internal error in the gateway", "server_error"))

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.keys and request.path != "/health":
            scheme, _, key = request.headers.get("Authorization", "").partition(" ")
            # every key compared in constant time, so the time taken tells nothing
            if scheme.lower() != "bearer" or not any(
                [hmac.compare_digest(key.strip().encode(), k) for k in self.keys]
            ):
                raise ApiError(
                    401,
                    "a valid API key is required: 'Authorization: Bearer <key>'",
                    "invalid_request_error",
                    code="invalid_api_key",
                )
        return await handler(request)

    # --- routes ---

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        req = api.embedding_request(api.read_json(await request.read()))
        ids = [uuid.uuid4().hex for _ in req.texts]
        t0 = time.monotonic()
        futures = await self.client.submit(
            prompt_job("embed", t, id=i, model=req.model, priority=req.priority)
            for i, t in zip(ids, req.texts, strict=True)
        )
        pending = set(futures)
        try:  # a request is answered whole: its first failure ends it
            while pending:
                done, pending = await asyncio.wait(
                    pending, timeout=self.cfg.gateway.timeout_s, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    raise TimeoutError(f"no embedding within {self.cfg.gateway.timeout_s:g} s")
                if any(not f.result().ok for f in done):
                    break
        finally:
            # the rest would run for no one (and, after a busy, hold the queue a retry needs)
            self._abandon([i for i, f in zip(ids, futures, strict=True) if not f.done()])
        for k, f in enumerate(futures):
            if f.done() and not f.result().ok:
                error = f.result().error
                self.metrics.failed(error)
                where = f"input[{k}]: " if len(futures) > 1 else ""
                raise api.job_error(error, where, "input")
        results = [f.result() for f in futures]
        tokens = sum(r.tokens for r in results)
        self.metrics.embedded(len(results), tokens, time.monotonic() - t0)
        rows = [r.embedding or [] for r in results]
        return web.json_response(api.embedding_response(req, rows, tokens), dumps=dumps)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = api.completion_request(api.read_json(await request.read()))
        return await self._generate(request, req, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        req, messages = api.chat_request(api.read_json(await request.read()))
        req.prompts = [self.texts.chat(messages, req.model)]
        return await self._generate(request, req, chat=True)

    async def models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"object": "list", "data": await self._served()})

    async def model(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["model"]
        for m in await self._served():
            if m["id"] == name:
                return web.json_response(m)
        raise ApiError(
            404, f"the model {name!r} does not exist", param="model", code="model_not_found"
        )

    async def health(self, request: web.Request) -> web.StreamResponse:
        """200 only when the broker admits jobs and a controller and all its workers are ready."""
        try:
            status = await self._status()
        except TimeoutError as e:
            return web.json_response({"status": "unavailable", "reason": str(e)}, status=503)
        why = unready(status)
        if why:
            return web.json_response({"status": "unavailable", "reason": why}, status=503)
        return web.json_response({"status": "ok"})

    async def scrape(self, request: web.Request) -> web.StreamResponse:
        status = await self._status()
        body, content_type = self.metrics.render(status)
        return web.Response(body=body, headers={"Content-Type": content_type})

    # --- generation ---

    async def _generate(
        self, request: web.Request, req: CompletionRequest, chat: bool
    ) -> web.StreamResponse:
        t0 = time.monotonic()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        first: list[asyncio.Event] = [asyncio.Event() for _ in req.prompts]
        runs = [
            asyncio.create_task(self._choice(i, p, req, queue, first[i], t0))
            for i, p in enumerate(req.prompts)
        ]
        try:
            # nothing is sent before every choice has its first token or its refusal, so that a
            # refused request gets its own HTTP status rather than an error inside a 200 stream
            await asyncio.gather(*(e.wait() for e in first))
            events = pending(queue)
            failed = next((e.error for e in events if e.error is not None), None)
            if failed is not None:
                raise failed
            if req.stream:
                return await self._stream(request, req, chat, queue, events)
            ends: dict[int, Event] = {}
            texts = [""] * len(req.prompts)
            while len(ends) < len(req.prompts):
                e = events.pop(0) if events else await queue.get()
                if e.error is not None:
                    raise e.error
                texts[e.index] += e.text
                if e.final:
                    ends[e.index] = e
            return web.json_response(completion(req, chat, texts, ends), dumps=dumps)
        finally:
            for run in runs:
                run.cancel()  # each cancels its job if it had not ended

    async def _stream(
        self,
        request: web.Request,
        req: CompletionRequest,
        chat: bool,
        queue: asyncio.Queue[Event],
        events: list[Event],
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        head = chunk_head(req, chat)
        if chat:
            await resp.write(api.sse(chunk(head, 0, {"role": "assistant", "content": ""}, chat)))
        ended: dict[int, Event] = {}
        while len(ended) < len(req.prompts):
            e = events.pop(0) if events else await queue.get()
            if e.error is not None:  # after the 200 went out: an error event, as OpenAI sends
                await resp.write(api.sse(e.error.body()))
                break
            if e.text or e.final:
                content = {"content": e.text} if chat else e.text
                await resp.write(api.sse(chunk(head, e.index, content, chat, e.finish_reason, req)))
            if e.final:
                ended[e.index] = e
        if req.include_usage and len(ended) == len(req.prompts):
            prompt = sum(e.prompt_tokens for e in ended.values())
            done = sum(e.completion_tokens for e in ended.values())
            await resp.write(api.sse({**head, "choices": [], "usage": api.usage(prompt, done)}))
        await resp.write(api.sse("[DONE]"))
        await resp.write_eof()
        return resp

    async def _choice(
        self,
        index: int,
        prompt: str | list[int],
        req: CompletionRequest,
        out: asyncio.Queue[Event],
        started: asyncio.Event,
        t0: float,
    ) -> None:
        """One prompt's generate job, streamed into `out` as text events; a stop string ends
        it early (the job is cancelled, its blocks freed). Cancelling this task cancels the job
        unless it has ended."""
        job_id = uuid.uuid4().hex
        ended = False
        try:
            stream = self.client.generate_stream(prompt, id=job_id, model=req.model, **req.fields)
            timed = self._timed(stream, started, t0)
            async for e in until_stop(index, timed, self.texts, req.stop, prompt):
                if e.final:
                    ended = e.result is not None
                    if e.result is not None and not e.result.ok:
                        self.metrics.failed(e.result.error)
                    else:
                        elapsed = time.monotonic() - t0
                        reason = e.finish_reason or "stop"
                        self.metrics.finished(reason, e.prompt_tokens, e.completion_tokens, elapsed)
                out.put_nowait(e)
        except TimeoutError as e:
            out.put_nowait(
                Event(index, error=ApiError(504, str(e), "server_error", code="timeout"))
            )
        except Exception:  # the handler waits on this choice: it must hear of any end
            log.exception("completion choice %d failed", index)
            out.put_nowait(Event(index, error=ApiError(500, "internal error", "server_error")))
        finally:
            started.set()
            if not ended:
                self._abandon([job_id])

    async def _timed(
        self, deltas: AsyncIterator[Delta], started: asyncio.Event, t0: float
    ) -> AsyncIterator[Delta]:
        """The deltas, passed on as they come, with the latency metrics taken on the way."""
        last = t0
        async for delta in deltas:
            now = time.monotonic()
            if not started.is_set():
                self.metrics.first_token(now - t0)
            elif delta.token_ids:
                self.metrics.between_tokens(now - last, len(delta.token_ids))
            last = now
            started.set()
            yield delta

    # --- helpers ---

    def _abandon(self, ids: list[str]) -> None:
        """Cancel jobs whose answer no one waits for any more (their KV blocks are freed); in a
        task of its own, since the caller is usually being cancelled."""
        if not ids:
            return
        task = asyncio.get_running_loop().create_task(self._cancel(ids))
        self.chores.add(task)
        task.add_done_callback(self.chores.discard)

    async def _cancel(self, ids: list[str]) -> None:
        try:
            await self.client.cancel(ids)
        except (TimeoutError, RuntimeError) as e:  # the broker is gone or the client closed
            log.warning("could not cancel %d abandoned jobs: %s", len(ids), e)

    async def _status(self) -> dict[str, Any]:
        """The broker's status, or TimeoutError (a 504) when it is silent for STATUS_TIMEOUT_S."""
        async with asyncio.timeout(STATUS_TIMEOUT_S):
            return await self.client.status()

    async def _served(self) -> list[dict[str, Any]]:
        status = await self._status()
        return [
            {"id": name, "object": "model", "created": STARTED, "owned_by": "baton"}
            for name in status.get("models") or []
        ]


STARTED = int(time.time())


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def answer(e: ApiError) -> web.Response:
    headers = {}
    if e.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(e.retry_after_s)))  # whole seconds
    return web.json_response(e.body(), status=e.status, headers=headers, dumps=dumps)


def pending(queue: asyncio.Queue[Event]) -> list[Event]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


def unready(status: dict[str, Any]) -> str:
    """Why the fleet is not ready to serve ("" when it is)."""
    if not status.get("admitting"):
        return "the broker is draining"
    controllers = status.get("controllers") or []
    if not controllers:
        return "no controller has registered"
    busy = [c.get("pid") for c in controllers if c.get("state") != "ready"]
    if busy:
        return f"controllers {busy} are not ready"
    workers = status.get("workers") or []
    if not workers:
        return "no workers"
    down = [w.get("rank") for w in workers if w.get("state") != "ready"]
    return f"workers {down} are not ready" if down else ""


async def serve(
    cfg: Config,
    broker: str,
    sock: socket.socket,
    texts: Texts,
    keys: list[str],
    curve: tuple[str, str] | None = None,
    batch_dir: Path | None = None,
) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    # busy is passed on to the HTTP client as 429 with Retry-After rather than retried here
    client = Client(
        broker,
        limits=cfg.limits,
        timeout_s=cfg.gateway.timeout_s,
        curve_key=curve[0] if curve else None,
        server_key=curve[1] if curve else None,
        busy_attempts=0,
    )
    client.open()
    gateway = Gateway(cfg, client, texts, keys)
    app = gateway.app()
    batches = None
    if batch_dir is not None:
        # imported here: the batch modules build on this one's response writers
        from broker.batch_api import BatchApi
        from broker.batch_store import Store
        from broker.batches import Batches

        store = Store(batch_dir)
        gw = cfg.gateway
        batches = Batches(store, client, texts, gw.batch_window, gw.batch_expiry_s)
        BatchApi(store, batches, cfg.gateway.max_file_bytes).add_routes(app)
    # handler_cancellation: a client that disconnects cancels its handler, which cancels its jobs
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_S
    )
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        if batches is not None:
            batches.start()  # batches a previous run left unfinished go on
        await stop.wait()
    finally:
        await runner.cleanup()  # stops listening, lets in-flight requests finish (bounded)
        if batches is not None:
            await batches.close()  # each batch stays where its last commit left it
        await asyncio.gather(*gateway.chores, return_exceptions=True)
        client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m broker.gateway")
    p.add_argument("--broker", required=True, help="the broker's client endpoint")
    p.add_argument("--fd", type=int, required=True, help="the listening socket, bound by baton up")
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--tokenizer", type=Path)
    p.add_argument("--curve-key", help="our secret certificate, for a broker requiring keys")
    p.add_argument("--server-key", help="the broker's certificate")
    p.add_argument("--batch-dir", type=Path, help="the Batch API's files and state")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # a terminal's ^C reaches the whole group: `baton up` decides when this process stops
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raw = json.loads(sys.stdin.read())  # the config, keys included
    keys = raw.get("gateway", {}).pop("keys", [])
    cfg = from_dict(raw)
    sock = socket.socket(fileno=args.fd)
    texts = Texts(args.model_dir, args.tokenizer)
    curve = (args.curve_key, args.server_key) if args.curve_key else None
    uvloop.run(serve(cfg, args.broker, sock, texts, keys, curve, args.batch_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
