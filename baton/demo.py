"""`baton demo`: start a fleet, embed a stdlib-paragraph workload through it, report throughput."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from tqdm import tqdm

from baton.client import Client, Result
from baton.launch import Fleet
from baton.workload import paragraphs

# ~27 tokens a paragraph: ~35 s of work at ~6000 tokens/s on a 2-core CPU
DEFAULT_NUM = 8000


@dataclass(slots=True)
class Stats:
    jobs: int = 0
    tokens: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)


def demo(config: str, sets: list[str], num: int | None) -> int:
    texts = paragraphs(DEFAULT_NUM if num is None else num)
    print(f"starting a fleet from {config}", file=sys.stderr)
    try:
        with Fleet(config, sets) as fleet:
            print(f"{fleet.ready_line}; log {fleet.log}", file=sys.stderr)
            stats = asyncio.run(push(fleet.endpoint, texts))
            code = fleet.stop()
    except (TimeoutError, RuntimeError) as e:
        print(f"baton demo: {e}", file=sys.stderr)
        return 1
    report(stats)
    if code != 0:
        print(f"baton demo: the fleet exited {code}; log {fleet.log}", file=sys.stderr)
    return 0 if stats.jobs == len(texts) and not stats.failures and code == 0 else 1


async def push(endpoint: str, texts: list[str], window: int = 512) -> Stats:
    """Every text through Client.run; latency is from handing a job to the client to its result."""
    stats = Stats()
    started: dict[str, float] = {}

    def jobs() -> Iterator[dict]:
        for i, text in enumerate(texts):
            started[f"demo-{i}"] = time.perf_counter()
            yield {"id": f"demo-{i}", "task": "embed", "text": text}

    t0 = time.perf_counter()
    async with Client(endpoint, timeout_s=120) as client:
        with tqdm(total=len(texts), unit="job", file=sys.stderr, mininterval=0.5) as bar:
            async for r in client.run(jobs(), window):
                count(stats, r, time.perf_counter() - started.pop(r.id))
                bar.update()
    stats.seconds = time.perf_counter() - t0
    return stats


def count(stats: Stats, r: Result, latency: float) -> None:
    stats.jobs += 1
    stats.latencies.append(latency)
    if r.ok:
        stats.tokens += r.tokens
    else:
        stats.failures[(r.error or {}).get("code", "?")] += 1


def report(stats: Stats) -> None:
    s = max(stats.seconds, 1e-9)
    lat = sorted(stats.latencies) or [0.0]
    fails = ", ".join(f"{c} {n}" for c, n in stats.failures.most_common()) or "none"
    print(f"jobs      {stats.jobs} in {stats.seconds:.1f} s: {stats.jobs / s:.1f} jobs/s")
    print(f"tokens    {stats.tokens}: {stats.tokens / s:.0f} tokens/s")
    print(f"latency   p50 {_pct(lat, 0.50) * 1e3:.0f} ms, p99 {_pct(lat, 0.99) * 1e3:.0f} ms")
    print(f"failures  {sum(stats.failures.values())} ({fails})")


def _pct(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
