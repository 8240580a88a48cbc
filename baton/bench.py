"""`baton bench`: a load generator for a running fleet, reporting what `vllm bench serve` reports.

Open loop: arrivals at `rate` jobs/s with Gamma-distributed gaps (burstiness 1 = Poisson; lower
is burstier; rate `inf` sends everything at once). Closed loop: `concurrency` jobs in flight,
topped up as results come back (through `Client.run`). Warm-up jobs run first and are not
counted. Latency (`e2el`) is from handing a job to the client to its result arriving.

Generate jobs are streamed, one `Client.generate_stream` each (under the same two loops), and
timed per job: TTFT from handing the job over to its first token, TPOT = (e2el - ttft) /
(output tokens - 1), ITL the gaps between deltas, per token (a delta of k tokens that came g
after the one before counts k gaps of g / k, so a job's ITLs add up to e2el - ttft; tokens that
came with the first one count 0). `generation` builds such a workload from the stdlib text.

The JSON uses vllm's names (`completed`, `request_throughput`, `output_throughput`,
`p99_ttft_ms`, `median_tpot_ms`, `mean_itl_ms`, `p99_e2el_ms`, ...) so the same scripts can read
both; the TTFT, TPOT and ITL figures are there for runs with generate jobs.
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
LATENCIES = ("e2el",)  # what every run measures
GENERATION_LATENCIES = ("ttft", "tpot", "itl", "e2el")  # what a run with generate jobs measures
PERCENTILES = (90, 99)
# vllm's section titles; e2el keeps the title this table always had
TITLES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency (e2el)",
}
# tokens a word of the stdlib text comes to in GPT-2-style BPE (1.3 for GPT-2's own, 1.45 for
# baton.random_gpt2's): the length of a text prompt is aimed with it when no tokenizer is given
TOKENS_PER_WORD = 1.4


@dataclass(slots=True)
class Sample:
    """One job's outcome: its latency in seconds, its input tokens, its error code if it failed.
    A generate job's also has its time to first token (s), output tokens, and inter-token
    latencies (s, one per token after the first)."""

    e2el: float
    tokens: int = 0
    error: str = ""
    ttft: float | None = None
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; None for fewer than two tokens (vllm's)."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


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
    generate: bool = False  # it had generate jobs: TTFT, TPOT and ITL are reported
    results: list[Result] | None = None  # generate jobs' results, when asked to keep them


@dataclass(frozen=True, slots=True)
class Lengths:
    """A length distribution in tokens: `N` (fixed) or `MIN:MAX` (uniform, both included)."""

    low: int
    high: int

    @classmethod
    def parse(cls, spec: str | int, what: str = "length") -> Lengths:
        text = str(spec).strip()
        low, sep, high = text.partition(":")
        try:
            out = cls(int(low), int(high) if sep else int(low))
        except ValueError:
            raise ValueError(f"{what} {text!r}: expected N or MIN:MAX (tokens)") from None
        out.check(what)
        return out

    def check(self, what: str = "length") -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"{what} {self}: need 1 <= MIN <= MAX")

    def draw(self, n: int, rng: random.Random) -> list[int]:
        return [rng.randint(self.low, self.high) for _ in range(n)]

    @property
    def mean(self) -> float:
        return (self.low + self.high) / 2

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


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


def generation(
    num: int,
    input_len: Lengths | str = "32:256",
    output_len: Lengths | str = "16:256",
    *,
    prefix_len: int = 0,
    tokenizer: str | Path | Any | None = None,
    source: str = "paragraphs",
    seed: int = 0,
    **fields: Any,
) -> list[dict]:
    """`num` generate jobs (no ids) on the stdlib text: prompts of `input_len` tokens, each after
    the same `prefix_len`-token prefix when it is > 0 (as vllm's --random-prefix-len: the prefix
    comes on top), and `max_new_tokens` drawn from `output_len` with `ignore_eos`, so every job
    makes exactly that many tokens. Prompts are consecutive stretches of the text from a place
    the seed picks, so no two share more than the prefix, nor do two workloads of other seeds
    (a server's prefix cache finds none of one run's prompts in another's).

    With `tokenizer` (a model directory, its tokenizer.json, or a `tokenizers.Tokenizer`) the
    prompts are token ids of exactly those lengths; without, they are texts of about that many
    tokens (TOKENS_PER_WORD), which the model's own tokenizer counts in `total_input_tokens`.
    `fields` go into every job (temperature, seed, model, ...). Same arguments, same jobs."""
    if num < 1:
        raise ValueError("--num must be at least 1")
    if prefix_len < 0:
        raise ValueError("--prefix-len must not be negative")
    if source not in WORKLOADS:
        raise ValueError(f"generation prompts come from {' or '.join(WORKLOADS)}, not {source!r}")
    ins = input_len if isinstance(input_len, Lengths) else Lengths.parse(input_len, "--input-len")
    outs = (
        output_len if isinstance(output_len, Lengths) else Lengths.parse(output_len, "--output-len")
    )
    ins.check("--input-len")
    outs.check("--output-len")
    rng = random.Random(seed)
    in_lens, out_lens = ins.draw(num, rng), outs.draw(num, rng)
    from baton import workload as w

    texts = w.paragraphs() if source == "paragraphs" else w.docstrings()
    first = rng.randrange(len(texts))
    texts = texts[first:] + texts[:first]
    if tokenizer is not None:
        unit: Callable[[int], list] = _token_stream(_tokenizer(tokenizer), texts)
    else:
        unit = _word_stream(texts)
    words = lambda n: max(1, round(n / TOKENS_PER_WORD))  # noqa: E731
    prefix: list = []
    if prefix_len:
        prefix = unit(prefix_len if tokenizer is not None else words(prefix_len))
    jobs = []
    for n_in, n_out in zip(in_lens, out_lens, strict=True):
        own = unit(n_in if tokenizer is not None else words(n_in))
        job: dict[str, Any] = {"task": "generate", **fields}
        if tokenizer is not None:
            job["token_ids"] = prefix + own
        else:
            job["text"] = " ".join(prefix + own)
        job["max_new_tokens"] = n_out
        job["ignore_eos"] = True
        jobs.append(job)
    return jobs


def _tokenizer(spec: str | Path | Any) -> Any:
    if not isinstance(spec, str | Path):
        return spec  # a tokenizers.Tokenizer already
    from tokenizers import Tokenizer

    path = Path(spec).expanduser()
    path = path / "tokenizer.json" if path.is_dir() else path
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception for a missing or bad file
        raise ValueError(f"tokenizer {path}: {e}") from None


def _token_stream(tok: Any, texts: list[str]) -> Callable[[int], list[int]]:
    """`take(n)`: the next n token ids of the texts encoded one after another, cycling."""
    ids: list[int] = []
    pos = 0
    chunk = 256  # texts encoded as needed: a short workload does not encode the whole stdlib
    nxt = 0

    def take(n: int) -> list[int]:
        nonlocal pos, nxt
        while len(ids) - pos < n:
            # a space before each text, so that the stream reads as the texts with spaces between
            batch = [" " + texts[(nxt + i) % len(texts)] for i in range(chunk)]
            nxt += chunk
            for enc in tok.encode_batch(batch, add_special_tokens=False):
                ids.extend(enc.ids)
        out = ids[pos : pos + n]
        pos += n
        return out

    return take


def _word_stream(texts: list[str]) -> Callable[[int], list[str]]:
    """`take(n)`: the next n words of the texts one after another, cycling."""
    state = {"text": 0, "words": [], "pos": 0}

    def take(n: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            if state["pos"] >= len(state["words"]):
                state["words"] = texts[state["text"] % len(texts)].split()
                state["text"] += 1
                state["pos"] = 0
                continue
            k = min(n - len(out), len(state["words"]) - state["pos"])
            out += state["words"][state["pos"] : state["pos"] + k]
            state["pos"] += k
        return out

    return take


# what a generate line of a workload file may set besides its prompt
GENERATE_FIELDS = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "ignore_eos",
    "stop_token_ids",
)


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
            if not isinstance(job, dict):
                raise ValueError(f"{path}:{n}: a job must be an object with a string 'text'")
            if job.get("task") == "generate" and isinstance(job.get("token_ids"), list):
                keys: tuple[str, ...] = ("task", "token_ids", "model", *GENERATE_FIELDS)
            elif isinstance(job.get("text"), str):
                keys = ("task", "text", "model")
                if job.get("task") == "generate":
                    keys += GENERATE_FIELDS
            else:
                raise ValueError(f"{path}:{n}: a job must be an object with a string 'text'")
            rows.append({k: job[k] for k in keys if k in job})
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
    client: Client,
    jobs: list[dict],
    load: Load,
    tick: Callable[[], None] = lambda: None,
    *,
    keep: bool = False,
) -> Run:
    """Every job through the fleet under `load`; one Sample per job. Jobs go one stream each
    when any is a generate job (`keep`: their Results are kept in `Run.results`)."""
    if any(j.get("task") == "generate" for j in jobs):
        return await _streamed(client, jobs, load, tick, keep)
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
            async with asyncio.timeout(client.timeout_s):
                await moved.wait()
        except TimeoutError:
            raise TimeoutError(
                f"{left} jobs outstanding and no result within {client.timeout_s:g} s"
            ) from None
    if failures:
        raise failures[0]  # a client-side failure (timeout) ends the run
    run.duration = time.perf_counter() - t0
    return run


async def _streamed(
    client: Client, jobs: list[dict], load: Load, tick: Callable[[], None], keep: bool
) -> Run:
    """One task per job, each timing its own stream: `concurrency` of them at a time (closed
    loop), or each started at its arrival (open loop). Each stream's wait is bounded by the
    client's timeout, so this is too; a client-side failure (timeout) ends the run."""
    run = Run(generate=True, results=[] if keep else None)

    async def one(job: dict) -> None:
        sample, result = await _stream(client, job)
        run.samples.append(sample)
        if run.results is not None and result is not None:
            run.results.append(result)
        tick()

    t0 = time.perf_counter()
    try:
        async with asyncio.TaskGroup() as group:
            if load.concurrency is not None:
                todo = iter(jobs)  # shared: each worker takes the next job when its own ends

                async def worker() -> None:
                    for job in todo:
                        await one(job)

                for _ in range(min(load.concurrency, len(jobs))):
                    group.create_task(worker())
            else:
                due = t0
                waits = gaps(len(jobs), load.rate, load.burstiness, load.seed)
                for job, wait in zip(jobs, waits, strict=True):
                    due += wait
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)  # the arrival gap itself, not synchronisation
                    group.create_task(one(job))
    except BaseExceptionGroup as group_error:
        raise group_error.exceptions[0] from None  # the first failure, as the other drivers do
    run.duration = time.perf_counter() - t0
    return run


async def _stream(client: Client, job: dict) -> tuple[Sample, Result | None]:
    """One job through `generate_stream` (other tasks through submit), timed as the module
    docstring says."""
    start = time.perf_counter()
    if job.get("task") != "generate":
        [fut] = await client.submit([job])
        [r] = await client.results([fut])
        return _sample(r, time.perf_counter() - start), None
    fields = {k: v for k, v in job.items() if k not in ("task", "text", "token_ids")}
    prompt = job["text"] if "text" in job else job["token_ids"]
    ttft: float | None = None
    itl: list[float] = []
    last = start
    result: Result | None = None
    async for delta in client.generate_stream(prompt, **fields):
        now = time.perf_counter()
        k = len(delta.token_ids)
        if k and ttft is None:
            ttft = now - start
            itl += [0.0] * (k - 1)  # came with the first token: no gap of their own
        elif k:
            itl += [(now - last) / k] * k
        if k:
            last = now
        result = delta.result
    e2el = time.perf_counter() - start
    assert result is not None  # generate_stream always ends with the result
    if not result.ok:
        return _sample(result, e2el), result
    n = len(result.token_ids or [])
    return Sample(e2el, result.prompt_tokens, "", ttft, n, itl), result


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
    """vllm bench serve's figures for one run; latencies of completed jobs only, in ms. TTFT,
    TPOT and ITL (vllm's) are there when the run had generate jobs; TPOT counts jobs of two
    tokens or more, as vllm's does."""
    ok = [s for s in run.samples if not s.error]
    duration = max(run.duration, 1e-9)
    tokens = sum(s.tokens for s in ok)
    output = sum(s.output_tokens for s in ok)
    out: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(run.samples) - len(ok),
        "errors": dict(Counter(s.error for s in run.samples if s.error)),
        "duration": run.duration,
        "request_rate": "inf" if math.isinf(load.rate) else load.rate,
        "burstiness": load.burstiness,
        "max_concurrency": load.concurrency,
        "total_input_tokens": tokens,
        "total_output_tokens": output,  # embeddings generate nothing
        "request_throughput": len(ok) / duration,
        "output_throughput": output / duration,
        "total_token_throughput": (tokens + output) / duration,
        "request_goodput": None,
    }
    if goodput:
        good = sum(all(_latency(s, k) * 1000 <= goodput[k] for k in goodput) for s in ok)
        out["request_goodput"] = good / duration
    series = {"e2el": [s.e2el * 1000 for s in ok]}
    if run.generate:
        series = {
            "ttft": [s.ttft * 1000 for s in ok if s.ttft is not None],
            "tpot": [t * 1000 for s in ok if (t := s.tpot) is not None],
            "itl": [x * 1000 for s in ok for x in s.itl],
            **series,
        }
    for name, values in series.items():
        out[f"mean_{name}_ms"] = statistics.fmean(values) if values else 0.0
        out[f"median_{name}_ms"] = percentile(values, 50)
        out[f"std_{name}_ms"] = statistics.pstdev(values) if values else 0.0
        for p in PERCENTILES:
            out[f"p{p}_{name}_ms"] = percentile(values, p)
    return out


def _latency(s: Sample, key: str) -> float:
    """A job's figure a goodput bound applies to, in s: its TTFT, TPOT (0 for a job of one
    token, as vllm counts it), worst inter-token gap, or e2el."""
    if key == "ttft":
        return s.ttft or 0.0
    if key == "tpot":
        return s.tpot or 0.0
    if key == "itl":
        return max(s.itl, default=0.0)
    return s.e2el


def slos(specs: list[str], generate: bool = False) -> dict[str, float]:
    """`KEY:MS` goodput bounds, vllm's `--goodput` syntax: a job is good when within all of
    them. ttft, tpot and itl (the job's worst gap) only for generate jobs."""
    out = {}
    keys = GENERATION_LATENCIES if generate else LATENCIES
    for spec in specs:
        key, sep, ms = spec.partition(":")
        if not sep:
            raise ValueError(f"--goodput {spec!r}: expected KEY:MS, e.g. e2el:500")
        if key not in keys:
            measured = ", ".join(keys)
            raise ValueError(f"--goodput {key!r}: only {measured} can be bounded here")
        try:
            out[key] = float(ms)
        except ValueError:
            raise ValueError(f"--goodput {spec!r}: {ms!r} is not a number of ms") from None
        if not out[key] > 0:
            raise ValueError(f"--goodput {spec!r}: the bound must be positive")
    return out


def table(m: dict[str, Any]) -> str:
    """The summary, laid out as vllm prints it."""
    generate = "mean_ttft_ms" in m
    rows: list[tuple[str, Any] | str] = [
        ("Successful requests:", m["completed"]),
        ("Failed requests:", m["failed"]),
        ("Benchmark duration (s):", f"{m['duration']:.2f}"),
        ("Total input tokens:", m["total_input_tokens"]),
    ]
    if generate:
        rows.append(("Total generated tokens:", m["total_output_tokens"]))
    rows.append(("Request throughput (req/s):", f"{m['request_throughput']:.2f}"))
    if m["request_goodput"] is not None:
        rows.append(("Request goodput (req/s):", f"{m['request_goodput']:.2f}"))
    if generate:
        rows.append(("Output token throughput (tok/s):", f"{m['output_throughput']:.2f}"))
    rows.append(("Total token throughput (tok/s):", f"{m['total_token_throughput']:.2f}"))
    for name in GENERATION_LATENCIES if generate else LATENCIES:
        rows.append(TITLES[name])
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


def jobs_of(args: Any, num: int, seed: int) -> list[dict]:
    """`num` jobs as the command line asks: a generation workload for `--task generate` on a
    built-in workload, else `workload`."""
    if args.task == "generate" and args.workload in WORKLOADS:
        return generation(
            num,
            args.input_len,
            args.output_len,
            prefix_len=args.prefix_len,
            tokenizer=args.tokenizer,
            source=args.workload,
            seed=seed,
        )
    return workload(args.workload, num, args.task)


def bench(args: Any) -> int:
    """`baton bench`: 0 when every job was answered (ok or error), 1 when the fleet was
    unreachable or jobs went unanswered, 2 for unusable arguments."""
    load = Load(args.rate, args.burstiness, args.concurrency, args.seed)
    try:
        load.check()
        goodput = slos(args.goodput or [], generate=args.task == "generate")
        jobs = jobs_of(args, args.num, args.seed)
        if args.warmup < 0:
            raise ValueError("--warmup must not be negative")
        # other prompts than the measured ones: a warm-up must not fill the prefix cache for them
        warm = jobs_of(args, args.warmup, args.seed + 1) if args.warmup else []
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
