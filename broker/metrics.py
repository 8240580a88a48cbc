"""The gateway's `/metrics`: Prometheus text, vLLM's metric names under a `baton:` prefix where
they apply, fed from what the gateway sees of each request and from the broker's status at
scrape time (queue and running counts, KV-cache use)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.utils import floatToGoString

from broker.buckets import LATENCY_BUCKETS

# each counter's `_created` twin is noise to a scraper that has its own clock
disable_created_metrics()

# vLLM's buckets for the same histograms (LATENCY_BUCKETS: broker/buckets.py)
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)


# Baton's job counters in the broker's status: (name, help)
JOBS = (
    ("accepted", "Jobs the broker accepted (journaled), all clients."),
    ("done", "Jobs finished ok."),
    ("failed", "Jobs finished with an error (refused at the door: not counted)."),
    ("cancelled", "Jobs cancelled."),
    ("retried", "Runs lost to a dead worker or controller and queued again."),
)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


class Fleet:
    """Baton's own figures, from the broker's status of the scrape (so they count every
    client's jobs, not only the gateway's): counters of jobs, worker restarts, batches and their
    tokens; the journal's group commits as a summary of their latency."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        jobs = self.status.get("jobs") or {}
        for key, what in JOBS:
            yield CounterMetricFamily(f"baton:jobs_{key}", what, value=jobs.get(key, 0))
        restarts = sum(w.get("restarts") or 0 for w in self.status.get("workers") or [])
        yield CounterMetricFamily(
            "baton:worker_restarts",
            "Worker restarts (a dead worker restarts its replica).",
            value=restarts,
        )
        stats = [c.get("stats") or {} for c in self.status.get("controllers") or []]
        batches, tokens, padded = (
            sum(s.get(k, 0) for s in stats) for k in ("batches", "tokens", "padded_tokens")
        )
        yield CounterMetricFamily(
            "baton:batches", "Micro-batches sent into the pipelines.", value=batches
        )
        yield CounterMetricFamily(
            "baton:batch_tokens", "Tokens those batches computed (no padding).", value=tokens
        )
        yield CounterMetricFamily(
            "baton:batch_padded_tokens",
            "Tokens those batches would hold padded to their longest sequence (over "
            "baton:batch_tokens: the padding ratio padding-free execution saves).",
            value=padded,
        )
        yield queue_time(self.status.get("queue_time") or {})
        journal = self.status.get("journal") or {}
        yield SummaryMetricFamily(
            "baton:journal_commit_latency_seconds",
            "The journal's group commits and the seconds they took.",
            count_value=journal.get("commits", 0),
            sum_value=journal.get("commit_seconds", 0.0),
        )
        yield GaugeMetricFamily(
            "baton:journal_pending_writes",
            "Journal writes waiting for their commit (grows while the disk fails).",
            value=journal.get("pending", 0),
        )


def queue_time(state: dict[str, Any]) -> HistogramMetricFamily:
    """The broker's queue-time histogram (broker/buckets.py's `state`) as Prometheus'."""
    le, counts = state.get("le") or [], state.get("buckets") or []
    return HistogramMetricFamily(
        "baton:request_queue_time_seconds",
        "Seconds from the broker's acceptance of a job to the controller first scheduling the "
        "run that answered it (every client's jobs, each once).",
        buckets=[
            *((floatToGoString(b), c) for b, c in zip(le, counts, strict=True)),
            ("+Inf", state.get("count", 0)),
        ],
        sum_value=state.get("sum", 0.0),
    )


class Metrics:
    def __init__(self) -> None:
        # a registry of its own: nothing of the process's default collectors leaks in twice
        self.registry = r = CollectorRegistry()
        self.fleet = Fleet()
        r.register(self.fleet)
        self.running = Gauge(
            "baton:num_requests_running",
            "Jobs running on a controller (broker status).",
            registry=r,
        )
        self.waiting = Gauge(
            "baton:num_requests_waiting", "Jobs queued at the broker (broker status).", registry=r
        )
        self.kv_usage = Gauge(
            "baton:kv_cache_usage_perc",
            "KV-cache blocks in use over all controllers, 0 to 1 (decoders; broker status).",
            registry=r,
        )
        self.prompt_tokens = Counter(
            "baton:prompt_tokens",
            "Prompt (and embedded input) tokens of finished requests.",
            registry=r,
        )
        self.generation_tokens = Counter(
            "baton:generation_tokens", "Tokens generated for finished requests.", registry=r
        )
        self.success = Counter(
            "baton:request_success",
            "Requests finished, by reason (stop, length; embedded for each embedding input).",
            ["finished_reason"],
            registry=r,
        )
        self.failure = Counter(
            "baton:request_failure", "Requests failed, by Baton's error code.", ["code"], registry=r
        )
        self.e2e = Histogram(
            "baton:e2e_request_latency_seconds",
            "Seconds from a request's arrival at the gateway to its last token or embedding.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "baton:time_to_first_token_seconds",
            "Seconds from a generation request's arrival to its first token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "baton:inter_token_latency_seconds",
            "Seconds between a streamed generation's tokens (a delta of n tokens: n of gap / n).",
            buckets=ITL_BUCKETS,
            registry=r,
        )

    def between_tokens(self, seconds: float, tokens: int) -> None:
        for _ in range(tokens):
            self.itl.observe(seconds / tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def finished(self, reason: str, prompt: int, generated: int, seconds: float) -> None:
        self.success.labels(reason).inc()
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(generated)
        self.e2e.observe(seconds)

    def embedded(self, inputs: int, tokens: int, seconds: float) -> None:
        self.success.labels("embedded").inc(inputs)
        self.prompt_tokens.inc(tokens)
        self.e2e.observe(seconds)

    def failed(self, error: dict[str, Any] | None) -> None:
        self.failure.labels(str((error or {}).get("code", "internal"))).inc()

    def render(self, status: dict[str, Any]) -> tuple[bytes, str]:
        """The text exposition, with the gauges read from a fresh broker status."""
        jobs = status.get("jobs") or {}
        self.running.set(jobs.get("running", 0))
        self.waiting.set(jobs.get("queued", 0))
        kvs = [(c.get("stats") or {}).get("kv") or {} for c in status.get("controllers") or []]
        total = sum(kv.get("blocks_total", 0) for kv in kvs)
        self.kv_usage.set(sum(kv.get("blocks_used", 0) for kv in kvs) / total if total else 0.0)
        self.fleet.status = status
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
