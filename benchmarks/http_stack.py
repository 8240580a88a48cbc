"""http_stack: what a trivial JSON POST costs on each HTTP stack the gateway could use.

Each server runs in its own process and answers `POST /echo` (a ~200-byte JSON body, parsed,
answered with a small JSON object), on uvloop: aiohttp's web server, Starlette on uvicorn
(httptools), and FastAPI on uvicorn with a pydantic body model (how FastAPI is usually
written). One client process keeps `--connections` keep-alive connections busy with a raw
HTTP/1.1 loop (the lightest client there is, so that the servers' differences show).

Reported per stack, median [min-max] over interleaved repeats: requests/s, and the server
process's CPU microseconds per request (/proc user + system time), the figure that survives a
busy machine best. `pip install -e '.[http-stacks]'`, then
`python -m benchmarks.http_stack [--requests N] [--repeats R]`; results in docs/gateway.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import uvloop

from baton.launch import REPO, free_port

STACKS = ("aiohttp", "starlette", "fastapi")
BODY = json.dumps({"model": "all-MiniLM-L6-v2", "input": "a short text to embed " * 8}).encode()


def serve(stack: str, port: int) -> None:
    """The server side of one stack, in this process, until killed."""
    if stack == "aiohttp":
        from aiohttp import web

        async def echo(request: web.Request) -> web.Response:
            body = json.loads(await request.read())
            return web.json_response({"object": "echo", "chars": len(body["input"])})

        app = web.Application()
        app.router.add_post("/echo", echo)
        web.run_app(
            app,
            host="127.0.0.1",
            port=port,
            access_log=None,
            print=None,
            loop=uvloop.new_event_loop(),
        )
        return
    import uvicorn

    if stack == "starlette":
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def route(request: Request) -> JSONResponse:
            body = json.loads(await request.body())
            return JSONResponse({"object": "echo", "chars": len(body["input"])})

        app = Starlette(routes=[Route("/echo", route, methods=["POST"])])
    else:
        from fastapi import FastAPI
        from pydantic import BaseModel

        class Body(BaseModel):
            model: str
            input: str

        async def echo_fastapi(body: Body) -> dict:
            return {"object": "echo", "chars": len(body.input)}

        # this module's annotations are strings, and Body is local: FastAPI needs the class
        echo_fastapi.__annotations__ = {"body": Body, "return": dict}
        app = FastAPI()
        app.post("/echo")(echo_fastapi)

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


async def load(port: int, requests: int, connections: int) -> float:
    """Send `requests` POSTs over `connections` keep-alive connections; returns seconds."""
    head = (
        f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    ).encode()
    left = requests

    async def one() -> None:
        nonlocal left
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while left > 0:
                left -= 1
                writer.write(head + BODY)
                headers = await reader.readuntil(b"\r\n\r\n")
                if not headers.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(headers.decode(errors="replace"))
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in headers.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(connections)))
    return time.perf_counter() - t0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def ready(port: int, bound_s: float = 60) -> None:
    """Until the server accepts connections (bounded)."""
    deadline = time.monotonic() + bound_s
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)  # polling a socket that is not listening yet, bounded


def measure(stack: str, requests: int, connections: int) -> tuple[float, float]:
    """(requests/s, server CPU µs per request) of one run against a fresh server."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.http_stack", "--serve", stack, "--port", str(port)],
        cwd=REPO,
    )
    try:
        uvloop.run(ready(port))
        uvloop.run(load(port, connections * 20, connections))  # warm-up: imports, first paths
        before = cpu_s(proc.pid)
        seconds = uvloop.run(load(port, requests, connections))
        used = cpu_s(proc.pid) - before
    finally:
        proc.kill()
        proc.wait(30)
    return requests / seconds, used / requests * 1e6


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--serve", choices=STACKS)
    p.add_argument("--port", type=int)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port)
        return
    runs: dict[str, list[tuple[float, float]]] = {s: [] for s in STACKS}
    for _ in range(args.repeats):
        for stack in STACKS:  # interleaved: a slow spell of the machine hits every stack
            runs[stack].append(measure(stack, args.requests, args.connections))
    print(f"{args.requests} POSTs, {args.connections} connections, {args.repeats} repeats")
    print("| stack | requests/s | server CPU µs/request |\n|---|---|---|")
    for stack, rs in runs.items():
        rate, cpu = [r[0] for r in rs], [r[1] for r in rs]
        print(
            f"| {stack} | {statistics.median(rate):,.0f} [{min(rate):,.0f}-{max(rate):,.0f}] "
            f"| {statistics.median(cpu):.0f} [{min(cpu):.0f}-{max(cpu):.0f}] |"
        )


if __name__ == "__main__":
    main()
