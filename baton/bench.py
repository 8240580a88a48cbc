"""`baton bench`: a load generator for a running fleet, reporting what `vllm bench serve` reports.

Open loop: arrivals at `rate` jobs/s with Gamma-distributed gaps (burstiness 1 = Poisson; lower
is burstier; rate `inf` sends everything at once). Closed loop: `concurrency` jobs in flight,
topped up as results come back (through `Client.run`). Warm-up jobs run first and are not
counted. Latency (`e2el`) is from handing a job to the client to its result arriving.

The JSON uses vllm's names (`completed`, `request_throughput`, `p99_e2el_ms`, ...) so the same
scripts can read both; `ttft`, `tpot` and `itl` will join `e2el` when generation does.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from baton.client import Client, Result

WORKLOADS = ("paragraphs", "docstrings")
LATENCIES = ("e2el",)  # ttft, tpot, itl come with generation
PERCENTILES = (90, 99)


@dataclass(slots=True)
class Sample:
    """One job's outcome: its latency in seconds, its input tokens, its error code if it failed."""

    e2el: float
    tokens: int = 0
    error: str = ""


@dataclass(slots=True)
class Load:
    """How jobs arrive: open loop at `rate` (with `burstiness`), or closed loop (`concurrency`)."""

    rate: float = math.inf
    burstiness: float = 1.0
    concurrency: int | None = None
    seed: int = 0

    def check(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
        if not self.rate > 0:
            raise ValueError("--rate must be positive (or inf)")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError("--burstiness must be a positive number")


@dataclass(slots=True)
class Run:
    samples: list[Sample] = field(default_factory=list)
    duration: float = 0.0


# --- workloads ---


def workload(name: str, num: int, task: str = "embed") -> list[dict]:
    """`num` jobs (no ids): a built-in workload of `task` jobs, or a JSONL file used in order and
    cycled. A file's own ids are dropped: a repeated id would attach to the first job or get its
    kept result back instead of running again."""
    if num < 1:
        raise ValueError("--num must be at least 1")
    if name in WORKLOADS:
        from baton import workload as w

        texts = w.paragraphs(num) if name == "paragraphs" else w.docstrings(num)
        return [{"task": task, "text": t} for t in texts]
    rows = read(Path(name))
    return [dict(rows[i % len(rows)]) for i in range(num)]


def read(path: Path) -> list[dict]:
    """The jobs of a `baton submit` input file, without their ids."""
    rows = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                job = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from None
            if not isinstance(job, dict) or not isinstance(job.get("text"), str):
                raise ValueError(f"{path}:{n}: a job must be an object with a string 'text'")
            rows.append({k: job[k] for k in ("task", "text", "model") if k in job})
    if not rows:
        raise ValueError(f"{path}: no jobs")
    return rows


def named(jobs: list[dict], tag: str) -> list[dict]:
    """Fresh ids: unique per run, so nothing is answered from the broker's kept results."""
    return [{**j, "id": f"{tag}-{i}"} for i, j in enumerate(jobs)]


# --- arrivals ---


def gaps(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds before each arrival: Gamma(shape=burstiness, mean=1/rate), as vllm draws them.
    Mean gap 1/rate whatever the burstiness; the spread grows as burstiness falls."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, scale) for _ in range(n)]


async def drive(
    client: Client, jobs: list[dict], load: Load, tick: Callable[[], None] = lambda: None
) -> Run:
    """Every job through the fleet under `load`; one Sample per job."""
    if load.concurrency is not None:
        return await _closed(client, jobs, load.concurrency, tick)
    return await _open(client, jobs, gaps(len(jobs), load.rate, load.burstiness, load.seed), tick)


async def _closed(client: Client, jobs: list[dict], window: int, tick: Callable[[], None]) -> Run:
    run = Run()
    started: dict[str, float] = {}

    def feed() -> Iterator[dict]:
        for job in jobs:
            started[job["id"]] = time.perf_counter()
            yield job

    t0 = time.perf_counter()
    # Client.run tops the window up in chunks (a quarter of it), so between 3/4 and all of
    # `window` jobs are in flight: a submit per finished job would measure the submits instead
    async for r in client.run(feed(), window):
        run.samples.append(_sample(r, time.perf_counter() - started.pop(r.id)))
        tick()
    run.duration = time.perf_counter() - t0
    return run


async def _open(
    client: Client, jobs: list[dict], waits: list[float], tick: Callable[[], None]
) -> Run:
    run = Run()
    loop = asyncio.get_running_loop()
    sends: list[asyncio.Task] = []
    left = len(jobs)
    moved = asyncio.Event()  # set on every result: the wait below is bounded by progress
    failures: list[BaseException] = []

    def done(fut: asyncio.Future[Result], sent: float) -> None:
        nonlocal left
        left -= 1
        moved.set()
        if fut.cancelled() or fut.exception() is not None:
            failures.append(fut.exception() or asyncio.CancelledError())
            return
        run.samples.append(_sample(fut.result(), time.perf_counter() - sent))
        tick()

    async def send(batch: list[dict]) -> None:
        sent = time.perf_counter()
        for fut in await client.submit(batch):
            fut.add_done_callback(lambda f, s=sent: done(f, s))

    t0 = time.perf_counter()
    due, i = t0, 0
    while i < len(jobs):
        due += waits[i]
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # the arrival gap itself, not synchronisation
        # every job already due goes in one submit: arrivals faster than a submit round trip
        # must not fall behind their schedule
        batch = [jobs[i]]
        i += 1
        now = time.perf_counter()
        while i < len(jobs) and due + waits[i] <= now:
            due += waits[i]
            batch.append(jobs[i])
            i += 1
        # not awaited here: the next arrival must not wait for this one's `accepted`
        sends.append(loop.create_task(send(batch)))
    await asyncio.gather(*sends)
    while left and not failures:
        moved.clear()
        try:
            await asyncio.wait_for(moved.wait(), client.timeout_s)
        except TimeoutError:
            raise TimeoutError(
                f"{left} jobs outstanding and no result within {client.timeout_s:g} s"
            ) from None
    if failures:
        raise failures[0]  # a client-side failure (timeout) ends the run
    run.duration = time.perf_counter() - t0
    return run


def _sample(r: Result, latency: float) -> Sample:
    if r.ok:
        return Sample(latency, r.tokens)
    return Sample(latency, 0, str((r.error or {}).get("code", "?")))


# --- metrics ---


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between ranks (numpy's default)."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def metrics(run: Run, load: Load, goodput: dict[str, float] | None = None) -> dict[str, Any]:
    """vllm bench serve's figures for one run; latencies of completed jobs only, in ms."""
    ok = [s for s in run.samples if not s.error]
    duration = max(run.duration, 1e-9)
    tokens = sum(s.tokens for s in ok)
    e2el = [s.e2el * 1000 for s in ok]
    out: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(run.samples) - len(ok),
        "errors": dict(Counter(s.error for s in run.samples if s.error)),
        "duration": run.duration,
        "request_rate": "inf" if math.isinf(load.rate) else load.rate,
        "burstiness": load.burstiness,
        "max_concurrency": load.concurrency,
        "total_input_tokens": tokens,
        "total_output_tokens": 0,  # embeddings generate nothing
        "request_throughput": len(ok) / duration,
        "output_throughput": 0.0,
        "total_token_throughput": tokens / duration,
        "request_goodput": None,
    }
    if goodput:
        good = sum(all(s.e2el * 1000 <= goodput[k] for k in goodput) for s in ok)
        out["request_goodput"] = good / duration
    for name, values in (("e2el", e2el),):
        out[f"mean_{name}_ms"] = statistics.fmean(values) if values else 0.0
        out[f"median_{name}_ms"] = percentile(values, 50)
        out[f"std_{name}_ms"] = statistics.pstdev(values) if values else 0.0
        for p in PERCENTILES:
            out[f"p{p}_{name}_ms"] = percentile(values, p)
    return out


def slos(specs: list[str]) -> dict[str, float]:
    """`KEY:MS` goodput bounds, vllm's `--goodput` syntax."""
    out = {}
    for spec in specs:
        key, sep, ms = spec.partition(":")
        if not sep:
            raise ValueError(f"--goodput {spec!r}: expected KEY:MS, e.g. e2el:500")
        if key not in LATENCIES:
            raise ValueError(f"--goodput {key!r}: only {', '.join(LATENCIES)} is measured here")
        try:
            out[key] = float(ms)
        except ValueError:
            raise ValueError(f"--goodput {spec!r}: {ms!r} is not a number of ms") from None
        if not out[key] > 0:
            raise ValueError(f"--goodput {spec!r}: the bound must be positive")
    return out


def table(m: dict[str, Any]) -> str:
    """The summary, laid out as vllm prints it."""
    rows: list[tuple[str, Any] | str] = [
        ("Successful requests:", m["completed"]),
        ("Failed requests:", m["failed"]),
        ("Benchmark duration (s):", f"{m['duration']:.2f}"),
        ("Total input tokens:", m["total_input_tokens"]),
        ("Request throughput (req/s):", f"{m['request_throughput']:.2f}"),
    ]
    if m["request_goodput"] is not None:
        rows.append(("Request goodput (req/s):", f"{m['request_goodput']:.2f}"))
    rows.append(("Total token throughput (tok/s):", f"{m['total_token_throughput']:.2f}"))
    for name in LATENCIES:
        rows.append(f"End-to-end Latency ({name})")
        labels = {"mean": "Mean", "median": "Median", **{f"p{p}": f"P{p}" for p in PERCENTILES}}
        for stat, label in labels.items():
            rows.append((f"{label} {name.upper()} (ms):", f"{m[f'{stat}_{name}_ms']:.2f}"))
    if m["errors"]:
        rows.append(("Errors:", ", ".join(f"{k} {v}" for k, v in m["errors"].items())))
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]
    for row in rows:
        if isinstance(row, str):
            lines.append("{s:{c}^50}".format(s=f" {row} ", c="-"))
        else:
            lines.append(f"{row[0]:<40}{row[1]:<10}")
    lines.append("=" * 50)
    return "\n".join(lines)


# --- running ---


async def measure(
    endpoint: str,
    jobs: list[dict],
    load: Load,
    *,
    warmup: list[dict] = (),
    goodput: dict[str, float] | None = None,
    progress: bool = True,
    timeout_s: float = 120.0,
    curve_key: str | Path | None = None,
    server_key: str | Path | None = None,
) -> dict[str, Any]:
    """Run `warmup` (closed loop, uncounted), then every job under `load`; vllm's figures.
    `curve_key` and `server_key` are the Client's, for a broker that requires keys."""
    load.check()
    tag = uuid.uuid4().hex[:8]
    keys = {"curve_key": curve_key, "server_key": server_key}
    async with Client(endpoint, timeout_s=timeout_s, **keys) as client:
        if warmup:
            warm = named(list(warmup), f"warm-{tag}")
            await drive(client, warm, Load(concurrency=load.concurrency or len(warm)))
        with tqdm(
            total=len(jobs), unit="job", file=sys.stderr, mininterval=0.5, disable=not progress
        ) as bar:
            run = await drive(client, named(jobs, f"bench-{tag}"), load, bar.update)
    return metrics(run, load, goodput)


def run(endpoint: str, jobs: list[dict], load: Load, **kw: Any) -> dict[str, Any]:
    """`measure` from synchronous code, on uvloop (the client's own loop costs count too)."""
    import uvloop

    return uvloop.run(measure(endpoint, jobs, load, **kw))


def bench(args: Any) -> int:
    """`baton bench`: 0 when every job was answered (ok or error), 1 when the fleet was
    unreachable or jobs went unanswered, 2 for unusable arguments."""
    load = Load(args.rate, args.burstiness, args.concurrency, args.seed)
    try:
        load.check()
        goodput = slos(args.goodput or [])
        jobs = workload(args.workload, args.num, args.task)
        if args.warmup < 0:
            raise ValueError("--warmup must not be negative")
        warm = workload(args.workload, args.warmup, args.task) if args.warmup else []
    except (OSError, ValueError) as e:
        print(f"baton bench: {e}", file=sys.stderr)
        return 2
    try:
        # --key/--server-key, where the command line offers them (as submit's do)
        keys = {
            "curve_key": getattr(args, "key", None),
            "server_key": getattr(args, "server_key", None),
        }
        m = run(
            args.endpoint,
            jobs,
            load,
            warmup=warm,
            goodput=goodput,
            timeout_s=args.timeout,
            **keys,
        )
    except TimeoutError as e:
        print(f"baton bench: {e}", file=sys.stderr)
        return 1
    print(table(m))
    if args.json:
        Path(args.json).write_text(json.dumps(m, indent=2) + "\n")
    return 0
