"""Generation in `baton bench`, `baton demo --task generate` and `baton status`: the TTFT / TPOT /
ITL arithmetic, length distributions and workloads without processes, then one fleet on a tiny
random GPT-2 checkpoint for the command lines. No timings are asserted: this machine is small
and busy."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from baton import bench, commands
from baton.bench import Lengths, Load, Run, Sample
from baton.client import Client, Delta, Result
from baton.launch import REPO, Fleet
from baton.random_gpt2 import Shape, ensure

GPT2_CONFIG = REPO / "configs" / "gpt2.toml"
TINY = Shape(layers=2, hidden=64, heads=2, vocab=512, tokenizer_vocab=512, positions=256)
GENERATION_KEYS = {
    "total_output_tokens",
    "output_throughput",
    *(
        f"{s}_{n}_ms"
        for s in ("mean", "median", "std", "p90", "p99")
        for n in bench.GENERATION_LATENCIES
    ),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure(tmp_path_factory.mktemp("tiny-gpt2"), TINY)


# --- without processes ---


def test_generation_metrics() -> None:
    # two jobs: 5 tokens over 0.5 s after a 0.1 s first token; 1 token (no TPOT, as in vllm)
    a = Sample(0.5, tokens=10, ttft=0.1, output_tokens=5, itl=[0.1, 0.1, 0.05, 0.15])
    b = Sample(0.2, tokens=20, ttft=0.2, output_tokens=1)
    m = bench.metrics(Run([a, b, Sample(0.3, error="busy")], 2.0, generate=True), Load())
    assert m.keys() >= GENERATION_KEYS
    assert a.tpot == pytest.approx(0.1) and b.tpot is None
    assert m["completed"] == 2 and m["failed"] == 1
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (30, 6)
    assert m["output_throughput"] == pytest.approx(3.0)
    assert m["total_token_throughput"] == pytest.approx(18.0)
    assert m["mean_ttft_ms"] == pytest.approx(150.0)
    assert m["median_tpot_ms"] == pytest.approx(100.0)  # only the job of two or more tokens
    assert m["mean_itl_ms"] == pytest.approx(100.0)
    assert m["p99_itl_ms"] == pytest.approx(bench.percentile([100, 100, 50, 150], 99))
    assert m["mean_e2el_ms"] == pytest.approx(350.0)
    json.dumps(m, allow_nan=False)
    text = bench.table(m)
    for row in ("Total generated tokens:", "Output token throughput (tok/s):", "Mean TTFT (ms):"):
        assert row in text
    for title in ("Time to First Token", "Time per Output Token", "Inter-token Latency"):
        assert title in text
    # goodput: within every bound; tpot counts 0 for one token, itl is a job's worst gap
    good = bench.metrics(Run([a, b], 2.0, generate=True), Load(), {"ttft": 150.0, "tpot": 101.0})
    assert good["request_goodput"] == pytest.approx(0.5)  # a alone over 2 s: b's TTFT is 200 ms
    worst = bench.metrics(Run([a, b], 2.0, generate=True), Load(), {"itl": 120.0})
    assert worst["request_goodput"] == pytest.approx(0.5)  # b alone: a's 150 ms gap is out
    # an embed run reports as it always did
    embed = bench.metrics(Run([Sample(0.1, tokens=3)], 1.0), Load())
    assert "mean_ttft_ms" not in embed and "Time to First Token" not in bench.table(embed)


class FakeStream:
    """A client whose stream yields given deltas: the timing code's bookkeeping, not clocks."""

    def __init__(self, chunks: list[list[int]]) -> None:
        self.chunks = chunks

    async def generate_stream(self, prompt: object, **fields: object) -> AsyncIterator[Delta]:
        ids = [t for c in self.chunks for t in c]
        done = 0
        for chunk in self.chunks:
            yield Delta("j", done, chunk)
            done += len(chunk)
        yield Delta(
            "j", done, [], Result("j", "ok", token_ids=ids, finish_reason="length", prompt_tokens=7)
        )


def test_stream_timing_counts_every_token() -> None:
    # the first delta brings 3 tokens: 2 ITLs of 0 (they came with the first), then 1 per token
    client = FakeStream([[1, 2, 3], [4], [5, 6]])
    sample, result = asyncio.run(bench._stream(client, {"task": "generate", "token_ids": [1]}))
    assert result is not None and result.token_ids == [1, 2, 3, 4, 5, 6]
    assert (sample.tokens, sample.output_tokens, sample.error) == (7, 6, "")
    assert len(sample.itl) == 5 and sample.itl[:2] == [0.0, 0.0]
    assert sample.itl[3] == sample.itl[4]  # a delta's gap is split evenly among its tokens
    assert sample.ttft is not None and 0 <= sample.ttft <= sample.e2el
    assert sum(sample.itl) <= sample.e2el - sample.ttft + 1e-9


def test_lengths() -> None:
    assert Lengths.parse("8") == Lengths(8, 8) and str(Lengths(8, 8)) == "8"
    u = Lengths.parse("2:5")
    draws = u.draw(2000, random.Random(1))
    assert set(draws) == {2, 3, 4, 5} and draws == u.draw(2000, random.Random(1))
    assert sum(draws) / len(draws) == pytest.approx(u.mean, rel=0.05)
    for bad in ("0", "5:2", "x", "1:", ":3", "-1:4"):
        with pytest.raises(ValueError):
            Lengths.parse(bad)


def test_generation_workload_with_a_tokenizer(tiny: Path) -> None:
    jobs = bench.generation(30, "8:24", "2:6", prefix_len=16, tokenizer=tiny, seed=3)
    assert jobs == bench.generation(30, "8:24", "2:6", prefix_len=16, tokenizer=tiny, seed=3)
    rng = random.Random(3)
    ins, outs = Lengths(8, 24).draw(30, rng), Lengths(2, 6).draw(30, rng)
    prefix = jobs[0]["token_ids"][:16]
    for job, n_in, n_out in zip(jobs, ins, outs, strict=True):
        assert job["task"] == "generate" and job["ignore_eos"] is True
        assert job["max_new_tokens"] == n_out
        assert len(job["token_ids"]) == 16 + n_in and job["token_ids"][:16] == prefix
        assert all(0 <= t < TINY.vocab for t in job["token_ids"])
    assert len({tuple(j["token_ids"][16:]) for j in jobs}) == 30  # no two share more
    other = bench.generation(30, "8:24", "2:6", prefix_len=16, tokenizer=tiny, seed=4)
    # another seed's prompts start elsewhere in the text: not even its prefix is this one's
    assert other[0]["token_ids"][:16] != prefix


def test_generation_workload_as_text() -> None:
    jobs = bench.generation(20, "14", "3", prefix_len=28, temperature=0.5)
    words = [j["text"].split() for j in jobs]
    assert all(len(w) == 20 + 10 for w in words)  # 28 and 14 tokens at 1.4 tokens a word
    assert len({tuple(w[:20]) for w in words}) == 1 and len({tuple(w[20:]) for w in words}) == 20
    assert all(j["max_new_tokens"] == 3 and j["temperature"] == 0.5 for j in jobs)
    for bad in ({"prefix_len": -1}, {"source": "nonsense"}, {"output_len": "0"}):
        with pytest.raises(ValueError):
            bench.generation(2, **bad)


def test_generation_goodput_keys_and_files(tmp_path: Path) -> None:
    assert bench.slos(["ttft:100", "itl:20"], generate=True) == {"ttft": 100.0, "itl": 20.0}
    with pytest.raises(ValueError):
        bench.slos(["tpot:5"])  # an embed run has no TPOT
    path = tmp_path / "jobs.jsonl"
    rows = [
        {"id": "a", "task": "generate", "token_ids": [1, 2], "max_new_tokens": 4, "seed": 1},
        {"id": "b", "task": "generate", "text": "hi", "ignore_eos": True, "bogus": 1},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert bench.workload(str(path), 2) == [
        {"task": "generate", "token_ids": [1, 2], "max_new_tokens": 4, "seed": 1},
        {"task": "generate", "text": "hi", "ignore_eos": True},
    ]


def test_status_table_shows_the_kv_cache() -> None:
    kv = {
        "blocks_total": 100,
        "blocks_used": 7,
        "blocks_free": 93,
        "blocks_cached": 12,
        "block_size": 16,
        "prefix_hits_tokens": 480,
    }
    stats = {"waiting": 2, "running": 5, "preemptions": 1, "kv": kv}
    body = {"model": "m", "controllers": [{"pid": 42, "stats": stats}], "workers": []}
    text = commands.table(body)
    assert "blocks used 7  free 93  total 100 (16 tokens each)" in text
    assert "cached prefixes 12 blocks, 480 prompt tokens" in text
    assert "waiting 2  running 5  preemptions 1" in text
    encoder = commands.table({"model": "e", "controllers": [{"pid": 1, "stats": {}}]})
    assert "kv " not in encoder


def test_up_says_how_to_make_a_missing_model(tmp_path: Path) -> None:
    missing = tmp_path / "random-gpt2"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "baton.cli",
            "up",
            "-c",
            str(GPT2_CONFIG),
            "--set",
            f"model.path={missing}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert str(missing) in done.stderr and "baton demo --task generate" in done.stderr


# --- one fleet on the tiny checkpoint ---


@pytest.fixture(scope="module")
def fleet(tiny: Path) -> Iterator[Fleet]:
    f = Fleet(GPT2_CONFIG, ["workers.threads=1", f"model.path={tiny}"], ready_timeout_s=240).start()
    try:
        yield f
    finally:
        assert f.stop() == 0


def test_bench_generate_command(fleet: Fleet, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--num", "12", "--input-len", "8:24", "--output-len", "2:6", "--prefix-len", "32"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "baton.cli",
            "bench",
            "--endpoint",
            fleet.endpoint,
            "--task",
            "generate",
            *args,
            "--concurrency",
            "4",
            "--warmup",
            "2",
            "--goodput",
            "ttft:600000",
            "--goodput",
            "itl:600000",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for row in (
        "Output token throughput (tok/s):",
        "P99 TTFT (ms):",
        "Median TPOT (ms):",
        "Mean ITL (ms):",
    ):
        assert row in proc.stdout
    m = json.loads(out.read_text())
    assert m.keys() >= GENERATION_KEYS
    assert m["completed"] == 12 and m["failed"] == 0
    # lengths are exact: the same seed draws the same max_new_tokens, and ignore_eos holds them
    jobs = bench.generation(12, "8:24", "2:6", prefix_len=32)
    assert m["total_output_tokens"] == sum(j["max_new_tokens"] for j in jobs)
    assert m["total_input_tokens"] > 12 * 32
    assert 0 < m["median_ttft_ms"] <= m["p99_ttft_ms"] <= m["p99_e2el_ms"]
    assert m["request_goodput"] == pytest.approx(m["request_throughput"])


def test_bench_generate_api_and_status(fleet: Fleet, tiny: Path) -> None:
    jobs = bench.generation(10, "4:12", "3", prefix_len=32, tokenizer=tiny, seed=5)
    m = bench.run(fleet.endpoint, jobs, Load(rate=50.0, seed=1), progress=False)
    assert m["completed"] == 10 and m["failed"] == 0
    assert m["total_input_tokens"] == sum(len(j["token_ids"]) for j in jobs)  # exact prompts
    assert m["total_output_tokens"] == 30 and m["mean_tpot_ms"] > 0

    async def status() -> dict:
        async with Client(fleet.endpoint, timeout_s=30) as client:
            return await client.status()

    body = asyncio.run(status())
    [kv] = [c["stats"]["kv"] for c in body["controllers"]]
    assert kv["prefix_hits_tokens"] >= 32  # the shared prefix's two blocks were reused
    assert "cached prefixes" in commands.table(body)


def test_demo_generate(tiny: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "baton.cli",
            "demo",
            "--task",
            "generate",
            "--num",
            "8",
            "--set",
            f"model.path={tiny}",
            "--set",
            "workers.threads=1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RANDOM weights" in proc.stderr
    for line in ("tokens/s", "TTFT      p50", "TPOT      p50", "failures  0", "output    "):
        assert line in proc.stdout
