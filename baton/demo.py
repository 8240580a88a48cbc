"""`baton demo`: start a fleet, embed a stdlib-paragraph workload through it, report throughput.

`baton demo --task generate`: the same for generation, on configs/gpt2.toml. Its model directory
is made first when it is missing (baton.random_gpt2: random weights, so the text is noise, at no
download); prompts are stretches of the stdlib paragraphs, streamed, and the report gives output
tokens/s, TTFT and TPOT (as `baton bench` measures them) and a sample of the text.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from baton import bench
from baton.client import Client, Result
from baton.launch import REPO, Fleet
from baton.workload import paragraphs

# ~27 tokens a paragraph: ~35 s of work at ~6000 tokens/s on a 2-core CPU
DEFAULT_NUM = 8000

GENERATE_CONFIG = REPO / "configs" / "gpt2.toml"
# 128 jobs of 64 new tokens: ~8,000 tokens, 10-20 s of generation on a 2-core CPU for the
# default random model (4 layers x 256)
GENERATE_NUM = 128
GENERATE_INPUT = bench.Lengths(16, 128)
GENERATE_OUTPUT = 64
GENERATE_CONCURRENCY = 64


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


# --- generation ---


def demo_generate(config: str | None, sets: list[str], num: int | None) -> int:
    """`baton demo --task generate`: 0 when every job made its tokens and the fleet stopped
    cleanly, 1 when not, 2 for an unusable config."""
    from controller.config import ConfigError, load

    config = config or str(GENERATE_CONFIG)
    try:
        cfg = load(config, sets)
        if num is not None and num < 1:
            raise ValueError("--num must be at least 1")
        directory = prepare(cfg.model.path)
        jobs = generate_jobs(directory, GENERATE_NUM if num is None else num)
    except (ConfigError, ValueError, OSError) as e:
        print(f"baton demo: {e}", file=sys.stderr)
        return 2
    print(f"starting a fleet from {config}", file=sys.stderr)
    try:
        with Fleet(config, sets) as fleet:
            print(f"{fleet.ready_line}; log {fleet.log}", file=sys.stderr)
            run = asyncio.run(stream(fleet.endpoint, jobs))
            code = fleet.stop()
    except (TimeoutError, RuntimeError) as e:
        print(f"baton demo: {e}", file=sys.stderr)
        return 1
    m = bench.metrics(run, bench.Load(concurrency=GENERATE_CONCURRENCY))
    report_generation(m, run, jobs, directory)
    if code != 0:
        print(f"baton demo: the fleet exited {code}; log {fleet.log}", file=sys.stderr)
    return 0 if m["completed"] == len(jobs) and code == 0 else 1


def prepare(path: str) -> Path | None:
    """The model directory at `path`, made with random weights first when it has no model;
    None for a model inside a package (prompts are then texts)."""
    if path.startswith("package:"):
        return None
    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        from baton.random_gpt2 import ensure

        print(
            f"no model at {directory}: making a GPT-2-layout checkpoint with RANDOM weights "
            "there (once, no download); what it writes is noise, what it costs is real",
            file=sys.stderr,
        )
        ensure(directory)
        print(f"wrote {directory}", file=sys.stderr)
    elif (directory / "baton-random.json").is_file():
        print(
            f"{directory} holds RANDOM weights (made by baton.random_gpt2): its text is noise",
            file=sys.stderr,
        )
    return directory


def generate_jobs(directory: Path | None, num: int) -> list[dict]:
    """`num` prompts of GENERATE_INPUT tokens, GENERATE_OUTPUT new tokens each, both cut so that
    they fit the model's positions; token ids when the model has a tokenizer.json (exact
    lengths), texts otherwise."""
    positions = 1024
    tokenizer = None
    if directory is not None:
        conf = json.loads((directory / "config.json").read_text())
        positions = conf.get("n_positions") or conf.get("max_position_embeddings") or positions
        if (directory / "tokenizer.json").is_file():
            tokenizer = directory
    out = min(GENERATE_OUTPUT, positions // 2)
    high = min(GENERATE_INPUT.high, positions - out)
    ins = bench.Lengths(min(GENERATE_INPUT.low, high), high)
    return bench.generation(num, ins, bench.Lengths(out, out), tokenizer=tokenizer)


async def stream(endpoint: str, jobs: list[dict]) -> bench.Run:
    """Every job streamed, GENERATE_CONCURRENCY at a time, each timed as `baton bench` does."""
    load = bench.Load(concurrency=GENERATE_CONCURRENCY)
    async with Client(endpoint, timeout_s=120) as client:
        with tqdm(total=len(jobs), unit="job", file=sys.stderr, mininterval=0.5) as bar:
            return await bench.drive(client, bench.named(jobs, "demo"), load, bar.update, keep=True)


def report_generation(m: dict, run: bench.Run, jobs: list[dict], directory: Path | None) -> None:
    fails = ", ".join(f"{c} {n}" for c, n in m["errors"].items()) or "none"
    print(
        f"jobs      {m['completed']} in {m['duration']:.1f} s: {m['request_throughput']:.1f} jobs/s"
    )
    print(
        f"tokens    {m['total_output_tokens']} generated: {m['output_throughput']:.0f} tokens/s "
        f"(prompts {m['total_input_tokens']} tokens)"
    )
    print(f"TTFT      p50 {m['median_ttft_ms']:.0f} ms, p99 {m['p99_ttft_ms']:.0f} ms")
    print(f"TPOT      p50 {m['median_tpot_ms']:.1f} ms, p99 {m['p99_tpot_ms']:.1f} ms")
    print(f"failures  {m['failed']} ({fails})")
    sample = next((r for r in run.results or [] if r.ok), None)
    if sample is None:
        return
    job = jobs[int(sample.id.rpartition("-")[2])]
    prompt = job.get("text")
    if prompt is None and directory is not None:
        from tokenizers import Tokenizer

        prompt = Tokenizer.from_file(str(directory / "tokenizer.json")).decode(job["token_ids"])
    print(f"prompt    {_clip(prompt or '')}")
    print(f"output    {_clip(sample.text or str(sample.token_ids))}")


def _clip(text: str, width: int = 300) -> str:
    """One line: random weights write any bytes, newlines and control characters included."""
    flat = " ".join(text.split())
    flat = "".join(c if c.isprintable() else "?" for c in flat)
    return flat if len(flat) <= width else flat[: width - 3] + "..."
