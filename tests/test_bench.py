"""`baton bench`: arrivals, metrics, workloads, and one real run against a fleet. No timings are
asserted: this machine is small and busy."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import numpy as np
import pytest

from baton import bench
from baton.bench import Load, Run, Sample
from baton.launch import REPO

VLLM_KEYS = {
    "completed",
    "failed",
    "duration",
    "request_throughput",
    "total_token_throughput",
    "request_goodput",
    "mean_e2el_ms",
    "median_e2el_ms",
    "p90_e2el_ms",
    "p99_e2el_ms",
}


def test_gaps_all_at_once():
    assert bench.gaps(100, math.inf) == [0.0] * 100
    assert bench.gaps(100, math.inf, burstiness=0.3) == [0.0] * 100


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 4.0])
def test_gaps_mean_and_spread(burstiness):
    rate = 50.0
    g = bench.gaps(20_000, rate, burstiness, seed=7)
    assert g == bench.gaps(20_000, rate, burstiness, seed=7)  # seeded: reproducible
    assert all(x >= 0 for x in g)
    mean = statistics.fmean(g)
    assert mean == pytest.approx(1 / rate, rel=0.05)
    # Gamma(shape k): squared coefficient of variation 1/k (Poisson arrivals: 1)
    cv2 = statistics.pvariance(g) / mean**2
    assert cv2 == pytest.approx(1 / burstiness, rel=0.15)


def test_percentiles_match_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 100, 1001):
        xs = list(rng.exponential(10.0, n))
        for q in (0, 50, 90, 99, 100):
            assert bench.percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    assert bench.percentile([], 50) == 0.0
    assert bench.percentile([float(i) for i in range(1, 101)], 50) == pytest.approx(50.5)


def test_metrics_on_synthetic_latencies():
    samples = [Sample(i / 1000, tokens=10) for i in range(1, 101)]  # 1..100 ms
    samples += [Sample(0.5, error="busy"), Sample(0.7, error="busy"), Sample(0.1, error="internal")]
    m = bench.metrics(Run(samples, duration=2.0), Load(concurrency=8), {"e2el": 50.0})
    assert m.keys() >= VLLM_KEYS
    assert m["completed"] == 100 and m["failed"] == 3
    assert m["errors"] == {"busy": 2, "internal": 1}
    assert m["duration"] == 2.0
    assert m["request_throughput"] == pytest.approx(50.0)
    assert m["total_input_tokens"] == 1000
    assert m["total_token_throughput"] == pytest.approx(500.0)
    assert m["request_goodput"] == pytest.approx(25.0)  # 50 of them within 50 ms, over 2 s
    assert m["mean_e2el_ms"] == pytest.approx(50.5)
    assert m["median_e2el_ms"] == pytest.approx(50.5)
    assert m["p90_e2el_ms"] == pytest.approx(90.1)
    assert m["p99_e2el_ms"] == pytest.approx(99.01)
    assert m["max_concurrency"] == 8 and m["request_rate"] == "inf"
    json.dumps(m, allow_nan=False)  # plain JSON
    assert "Successful requests:" in bench.table(m) and "P99 E2EL (ms):" in bench.table(m)
    assert bench.metrics(Run(samples), Load())["request_goodput"] is None


def test_metrics_of_nothing():
    m = bench.metrics(Run([], 0.0), Load(rate=5.0))
    assert m["completed"] == 0 and m["median_e2el_ms"] == 0.0 and m["request_rate"] == 5.0


def test_goodput_specs():
    assert bench.slos(["e2el:500"]) == {"e2el": 500.0}
    for bad in ("e2el", "ttft:100", "e2el:soon", "e2el:0"):
        with pytest.raises(ValueError):
            bench.slos([bad])


def test_file_workload_cycles(tmp_path):
    path = tmp_path / "jobs.jsonl"
    rows = [
        {"id": "a", "task": "embed", "text": "first"},
        {"id": "b", "task": "echo", "text": "second"},
        {"id": "c", "text": "third", "model": "m"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    jobs = bench.workload(str(path), 7)
    assert [j["text"] for j in jobs] == ["first", "second", "third"] * 2 + ["first"]
    assert jobs[1] == {"task": "echo", "text": "second"}  # the file's ids are dropped
    assert jobs[2] == {"text": "third", "model": "m"}
    named = bench.named(jobs, "t")
    assert len({j["id"] for j in named}) == 7  # every repeat runs again
    assert bench.workload("paragraphs", 3, task="echo")[0]["task"] == "echo"
    for bad in ("not json\n", '{"id": "x"}\n', "\n"):
        path.write_text(bad)
        with pytest.raises(ValueError):
            bench.workload(str(path), 1)


def test_bad_arguments_exit_2(tmp_path):
    base = [sys.executable, "-m", "baton.cli", "bench", "--endpoint", "tcp://127.0.0.1:9"]
    for extra in (["--goodput", "ttft:100"], ["--concurrency", "0"], ["--rate", "0"]):
        proc = subprocess.run([*base, *extra], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "baton bench:" in proc.stderr


def test_bench_against_a_fleet(small_fleet, tmp_path):
    src = tmp_path / "mixed.jsonl"
    texts = ["The quick brown fox.", "A queue of jobs and a fleet of workers. " * 5, "ok"]
    src.write_text(
        "".join(
            json.dumps({"id": f"j{i}", "task": ("echo", "embed")[i % 2], "text": t}) + "\n"
            for i, t in enumerate(texts * 2)
        )
    )
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "baton.cli",
            "bench",
            "--endpoint",
            small_fleet.endpoint,
            "--workload",
            str(src),
            "--num",
            "30",
            "--concurrency",
            "16",
            "--warmup",
            "4",
            "--goodput",
            "e2el:60000",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Serving Benchmark Result" in proc.stdout
    m = json.loads(out.read_text())
    assert m.keys() >= VLLM_KEYS
    assert m["completed"] == 30 and m["failed"] == 0
    assert m["total_input_tokens"] > 0  # the embed half counted its tokens
    assert 0 < m["median_e2el_ms"] <= m["p99_e2el_ms"]
    assert m["request_goodput"] is not None


def test_open_loop_against_a_fleet(small_fleet):
    jobs = [{"task": "echo", "text": f"tick {i}"} for i in range(30)]
    m = bench.run(small_fleet.endpoint, jobs, Load(rate=300.0, seed=1), progress=False)
    assert m["completed"] == 30 and m["failed"] == 0
    assert m["request_rate"] == 300.0 and m["duration"] > 0
