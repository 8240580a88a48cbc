"""priority: time to first token of interactive requests (priority 0, one at a time) on an idle
fleet, and while a batch of generation jobs saturates it, sent at priority 1 (`batch`) or at
priority 0 like the interactive ones (`no priority`, for comparison); the batch must still
finish. GPT-2 8 x 512 layout, tensor 1 x pipeline 1.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence

import uvloop

from baton import bench
from baton.client import Client
from benchmarks import common
from benchmarks.common import Figures, Report, Target

INTERACTIVE = 24  # requests measured per run, one at a time


async def ttft(client: Client, prompts: list[dict]) -> list[float]:
    """Seconds to the first token of each prompt, sent one after another (each to its end)."""
    out = []
    for job in prompts:
        fields = {k: v for k, v in job.items() if k not in ("task", "text", "token_ids")}
        t = time.perf_counter()
        first = None
        async for _ in client.generate_stream(job.get("text") or job["token_ids"], **fields):
            first = first or time.perf_counter() - t
        out.append(first)
    return out


async def run(endpoint: str, prompts: list[dict], batch: list[dict], level: int | None) -> Figures:
    """TTFT p99 of `prompts`; with `level`, while `batch` runs at that priority (which must
    then finish, all of it)."""
    async with Client(endpoint, timeout_s=600) as c:
        if level is None:
            times = await ttft(c, prompts)
            return {"p99_ttft_ms": p99(times) * 1000, "median_ttft_ms": median(times) * 1000}
        t = time.perf_counter()
        queued = await c.submit({**j, "priority": level} for j in batch)
        times = await ttft(c, prompts)
        ahead = sum(f.done() for f in queued)
        results = await asyncio.gather(*queued)
        if not all(r.ok for r in results):
            raise RuntimeError(f"batch jobs failed: {[r.error for r in results if not r.ok][:3]}")
        return {
            "p99_ttft_ms": p99(times) * 1000,
            "median_ttft_ms": median(times) * 1000,
            "batch_done_during": ahead / len(batch),
            "batch_s": time.perf_counter() - t,  # what yielding to the interactive ones costs it
        }


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100)[98] if len(xs) > 1 else xs[0]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main(argv: Sequence[str] | None = None) -> dict:
    a = common.args(__doc__, argv)
    repeats = a.repeats or (1 if a.quick else 3)
    model = common.gpt2()
    prompts = bench.generation(
        8 if a.quick else INTERACTIVE, "32:64", "8:8", tokenizer=model, seed=7
    )
    batch = bench.generation(64 if a.quick else 256, "64:256", "64:128", tokenizer=model, seed=8)
    sets = [f"model.path={model}"]
    dist: list[dict] = []
    with common.fleets({"fleet": sets}, common.GPT2_CONFIG) as f:
        ep = f["fleet"].endpoint
        uvloop.run(run(ep, prompts[:4], [], None))  # warm-up, untimed
        runs = common.interleave(
            {
                "idle": lambda: uvloop.run(run(ep, prompts, batch, None)),
                "batch at priority 1": lambda: uvloop.run(run(ep, prompts, batch, 1)),
                "no priority": lambda: uvloop.run(run(ep, prompts, batch, 0)),
            },
            repeats,
            dist,
        )
    report = Report(
        "priority",
        "interactive TTFT while a generation batch saturates the fleet",
        "p99_ttft_ms",
        runs,
        {
            "loaded_vs_idle_p99_ttft": common.paired(
                runs, "batch at priority 1", "idle", "p99_ttft_ms"
            ),
            "no_priority_vs_idle_p99_ttft": common.paired(
                runs, "no priority", "idle", "p99_ttft_ms"
            ),
        },
        [Target("loaded_vs_idle_p99_ttft", "<=", 2.0)],
        {"interactive": len(prompts), "batch": len(batch), "model": "gpt2 8x512"},
        disturbance=dist,
    )
    return common.write(report, a.quick)


if __name__ == "__main__":
    main()
