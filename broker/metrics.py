"""The gateway's `/metrics`: Prometheus text, vLLM's metric names under a `baton:` prefix where
they apply, fed from what the gateway sees of each request and from the broker's status at
scrape time (queue and running counts, KV-cache use)."""

from __future__ import annotations

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

# each counter's `_created` twin is noise to a scraper that has its own clock
disable_created_metrics()

# vLLM's buckets for the same histograms
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
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


class Metrics:
    def __init__(self) -> None:
        # a registry of its own: nothing of the process's default collectors leaks in twice
        self.registry = r = CollectorRegistry()
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
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
