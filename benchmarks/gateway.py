"""gateway: the same single-text embedding requests through the HTTP gateway (`POST
/v1/embeddings`, one text a request, keep-alive connections) and through the ZeroMQ client (one
job a request), closed loop at the same concurrency, on one fleet, interleaved: jobs/s and p99
latency. `echo` has no HTTP route (it is not an OpenAI endpoint), so embeddings it is; short
texts, so that the front door's cost shows rather than the model's.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from contextlib import ExitStack

import aiohttp
import uvloop

from baton import bench
from baton.launch import Fleet
from benchmarks import common
from benchmarks.common import Figures, Report, Target

CONCURRENCY = 32
MODEL = "all-MiniLM-L6-v2"


def zeromq(endpoint: str, texts: list[str]) -> Figures:
    jobs = [{"task": "embed", "text": t} for t in texts]
    m = bench.run(endpoint, jobs, bench.Load(concurrency=CONCURRENCY), progress=False)
    if m["completed"] != len(jobs):
        raise RuntimeError(f"{m['completed']} of {len(jobs)} completed: {m['errors']}")
    return {"jobs_per_s": m["request_throughput"], "p99_ms": m["p99_e2el_ms"]}


def http(base: str, texts: list[str]) -> Figures:
    return uvloop.run(_http(base, texts))


async def _http(base: str, texts: list[str]) -> Figures:
    latencies: list[float] = []
    todo = iter(texts)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(base, connector=connector) as session:

        async def client() -> None:
            for text in todo:
                t = time.perf_counter()
                body = {"model": MODEL, "input": text}
                async with session.post("/v1/embeddings", json=body) as r:
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
                    await r.read()
                latencies.append(time.perf_counter() - t)

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
        duration = time.perf_counter() - began
    p99 = statistics.quantiles(latencies, n=100)[98]
    return {"jobs_per_s": len(texts) / duration, "p99_ms": p99 * 1000}


def main(argv: Sequence[str] | None = None) -> dict:
    a = common.args(__doc__, argv)
    repeats = a.repeats or (2 if a.quick else 5)
    texts = [j["text"][:80] for j in bench.workload("docstrings", 300 if a.quick else 3000)]
    dist: list[dict] = []
    with ExitStack() as stack:
        fleet = stack.enter_context(Fleet(common.CONFIG, [], ready_timeout_s=240, gateway=True))
        zeromq(fleet.endpoint, texts[:64])  # warm-up, untimed
        http(fleet.http, texts[:64])
        runs = common.interleave(
            {
                "zeromq": lambda: zeromq(fleet.endpoint, texts),
                "http": lambda: http(fleet.http, texts),
            },
            repeats,
            dist,
            alternate=True,
        )
    report = Report(
        "gateway",
        f"single-text embeddings, {CONCURRENCY} in flight: HTTP gateway vs ZeroMQ client",
        "jobs_per_s",
        runs,
        {
            "http_vs_zeromq_jobs_per_s": common.paired(runs, "http", "zeromq", "jobs_per_s"),
            "http_vs_zeromq_p99": common.paired(runs, "http", "zeromq", "p99_ms"),
        },
        [Target("http_vs_zeromq_jobs_per_s", ">=", 0.5)],
        {"texts": len(texts), "concurrency": CONCURRENCY, "chars_per_text": "<= 80"},
        disturbance=dist,
    )
    return common.write(report, a.quick)


if __name__ == "__main__":
    main()
