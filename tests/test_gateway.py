"""The HTTP gateway on the embedding fleet (conftest's small_fleet, MiniLM): the official `openai`
package gets what the ZeroMQ client gets, bit for bit; every kind of bad request is answered in
OpenAI's error shape with its status; /health, /v1/models and /metrics; and the start-up refusal
of an open non-loopback address."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest
from conftest import CONFIG
from prometheus_client.parser import text_string_to_metric_families

from baton.client import Client
from baton.launch import REPO, Fleet, free_port
from broker.openai_api import job_error

MODEL = "all-MiniLM-L6-v2"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A queue of jobs, a controller, and a fleet of workers.",
    "word",
]
WAIT_S = 120


def call(
    base: str,
    method: str,
    path: str,
    body: bytes | dict | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One raw HTTP request (for what the openai package would not send); the JSON it gets."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=WAIT_S)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        text = raw.decode()
        return resp.status, dict(resp.getheaders()), json.loads(text) if text[:1] in "{[" else text
    finally:
        conn.close()


def oai(fleet: Fleet, key: str = "unused") -> openai.OpenAI:
    # no retries: a refusal must reach the test as it was sent
    return openai.OpenAI(base_url=f"{fleet.http}/v1", api_key=key, max_retries=0, timeout=WAIT_S)


def baton_embeddings(fleet: Fleet, texts: list[str]) -> list[list[float]]:
    async def go() -> list[list[float]]:
        async with Client(fleet.endpoint, timeout_s=WAIT_S) as c:
            results = await c.embed(texts)
        assert all(r.ok for r in results), [r.error for r in results]
        return [r.embedding for r in results]

    return asyncio.run(go())


def assert_openai_error(got: tuple[int, dict, Any], status: int, code: str | None = None) -> dict:
    """An error in OpenAI's shape with this status (and code); returns the error object."""
    got_status, _, body = got
    assert got_status == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def test_embeddings_equal_the_zeromq_clients(small_fleet: Fleet) -> None:
    want = baton_embeddings(small_fleet, TEXTS)
    client = oai(small_fleet)
    # the openai package asks for base64 by default: float32 bytes, so equal bit for bit
    got = client.embeddings.create(model=MODEL, input=TEXTS)
    assert [d.index for d in got.data] == [0, 1, 2]
    assert [d.embedding for d in got.data] == want
    assert got.model == MODEL and got.usage.prompt_tokens == got.usage.total_tokens > len(TEXTS)
    # as JSON floats: a float32 printed and read back as a double is the same number
    floats = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    assert [floats.data[0].embedding] == want[:1]
    # vLLM's `priority` extension orders the wait, not the result
    later = client.embeddings.create(model=MODEL, input=TEXTS[0], extra_body={"priority": 2})
    assert [later.data[0].embedding] == want[:1]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": MODEL}, "input"),  # missing input
        ({"input": "x"}, "model"),  # missing model
        ({"model": MODEL, "input": 7}, "input"),
        ({"model": MODEL, "input": [1.5, "x"]}, "input"),
        ({"model": MODEL, "input": []}, "input"),
        ({"model": MODEL, "input": ""}, "input"),  # empty string: the broker's empty_text
        ({"model": MODEL, "input": ["a", "  "]}, "input"),
        ({"model": MODEL, "input": [[1, 2, 3], "x"]}, "input"),  # token ids and a text
        ({"model": MODEL, "input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"model": MODEL, "input": "x", "dimensions": 8}, "dimensions"),
        ({"model": 3, "input": "x"}, "model"),
        ({"model": MODEL, "input": "x", "priority": 10}, "priority"),
        ({"model": MODEL, "input": "x", "priority": "high"}, "priority"),
    ],
)
def test_bad_embedding_requests_are_400(small_fleet: Fleet, body: dict, param: str) -> None:
    error = assert_openai_error(call(small_fleet.http, "POST", "/v1/embeddings", body), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_request_errors_in_openai_shape(small_fleet: Fleet) -> None:
    http = small_fleet.http
    for raw in (b"{not json", b"\xff\xfe", b"[1, 2]", b""):
        assert_openai_error(call(http, "POST", "/v1/embeddings", raw), 400, "malformed")
    unknown = call(http, "POST", "/v1/embeddings", {"model": "no-such-model", "input": "x"})
    assert assert_openai_error(unknown, 404, "model_not_found")["param"] == "model"
    big = {"model": MODEL, "input": "word " * 30_000}  # over gateway.max_body_bytes
    assert_openai_error(call(http, "POST", "/v1/embeddings", big), 413)
    long = {"model": MODEL, "input": "word " * 5_000}  # under the body limit, over max_text_chars
    assert_openai_error(call(http, "POST", "/v1/embeddings", long), 400, "context_length_exceeded")
    assert_openai_error(call(http, "GET", "/v1/nothing-here"), 404)
    assert_openai_error(call(http, "GET", "/v1/embeddings"), 405)
    # this encoder serves no generation: the broker's unknown_task
    gen = call(http, "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert_openai_error(gen, 400, "unknown_task")
    # and has no chat template
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    assert_openai_error(
        call(http, "POST", "/v1/chat/completions", chat), 400, "chat_template_missing"
    )
    with pytest.raises(openai.NotFoundError):
        oai(small_fleet).embeddings.create(model="no-such-model", input="x")


def test_queue_full_is_429_with_retry_after(small_fleet: Fleet) -> None:
    # limits.max_queued is 64: 100 inputs in one request overflow it at the door
    body = {"model": MODEL, "input": [f"text number {i}" for i in range(100)]}
    status, headers, answer = call(small_fleet.http, "POST", "/v1/embeddings", body)
    assert_openai_error((status, headers, answer), 429, "rate_limit_exceeded")
    assert int(headers["Retry-After"]) >= 1


def test_models_health_and_metrics(small_fleet: Fleet) -> None:
    models = oai(small_fleet).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert oai(small_fleet).models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        oai(small_fleet).models.retrieve("no-such-model")
    status, _, body = call(small_fleet.http, "GET", "/health")
    assert (status, body) == (200, {"status": "ok"})
    oai(small_fleet).embeddings.create(model=MODEL, input="counted")
    status, headers, text = call(small_fleet.http, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    # read as Prometheus reads it
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples["baton:request_success_total", (("finished_reason", "embedded"),)] >= 1
    assert samples["baton:prompt_tokens_total", ()] >= 1
    assert ("baton:num_requests_waiting", ()) in samples
    assert samples["baton:journal_commit_latency_seconds_count", ()] >= 1
    # Baton's own counters are the broker's: what `baton status` says (nothing ran between)
    fleet = asyncio.run(status_of(small_fleet))
    for key in ("accepted", "done", "failed", "cancelled", "retried"):
        assert samples[f"baton:jobs_{key}_total", ()] == fleet["jobs"][key], key
    restarts = sum(w["restarts"] for w in fleet["workers"])
    assert samples["baton:worker_restarts_total", ()] == restarts
    batches = sum(c["stats"]["batches"] for c in fleet["controllers"])
    assert 0 < samples["baton:batches_total", ()] <= batches  # reports trail by a heartbeat


QUEUE_TIME = "baton:request_queue_time_seconds"


def queue_time(fleet: Fleet, key: str = "unused") -> tuple[float, float]:
    """(count, sum) of the queue-time histogram on /metrics, read as Prometheus reads it, after
    checking that it is a well-formed one."""
    status, _, text = call(
        fleet.http, "GET", "/metrics", headers={"Authorization": f"Bearer {key}"}
    )
    assert status == 200, text
    [family] = [f for f in text_string_to_metric_families(text) if f.name == QUEUE_TIME]
    assert family.type == "histogram"
    by = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    counts = [v for (name, _), v in by.items() if name.endswith("_bucket")]
    assert counts == sorted(counts) and counts[-1] == by[f"{QUEUE_TIME}_bucket", "+Inf"]
    count, total = by[f"{QUEUE_TIME}_count", None], by[f"{QUEUE_TIME}_sum", None]
    assert count == counts[-1] and total >= 0
    return count, total


def test_queue_time_counts_each_job_once(small_fleet: Fleet) -> None:
    before, before_s = queue_time(small_fleet)
    t0 = time.monotonic()
    oai(small_fleet).embeddings.create(model=MODEL, input=TEXTS)  # one request, 3 jobs
    oai(small_fleet).embeddings.create(model=MODEL, input=TEXTS[0])
    baton_embeddings(small_fleet, TEXTS)  # ZeroMQ clients' jobs count too
    elapsed = time.monotonic() - t0
    after, after_s = queue_time(small_fleet)
    n = 2 * len(TEXTS) + 1
    assert after - before == n
    # each job waited at least nothing and at most while the test waited for it
    assert 0 <= after_s - before_s <= n * elapsed
    fleet = asyncio.run(status_of(small_fleet))
    assert fleet["queue_time"]["count"] == after  # nothing ran between


async def status_of(fleet: Fleet) -> dict[str, Any]:
    async with Client(fleet.endpoint, timeout_s=WAIT_S) as c:
        return await c.status()


def up_refuses(listen: str) -> str:
    """`baton up` with this gateway.listen must exit 2 before anything starts; its stderr."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "baton.cli",
            "up",
            "-c",
            str(CONFIG),
            "--set",
            f'gateway.listen="{listen}"',
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert done.returncode == 2, done.stderr
    assert "ready" not in done.stdout
    return done.stderr


def test_open_non_loopback_address_is_refused() -> None:
    stderr = up_refuses(f"0.0.0.0:{free_port()}")
    assert "gateway.listen" in stderr and "gateway.api_keys" in stderr


def test_a_taken_port_is_refused() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        assert f"cannot listen on gateway.listen = '{listen}'" in up_refuses(listen)


@pytest.mark.parametrize(
    "code, status, retry",
    [
        ("busy", 429, 0.25),
        ("shutting_down", 503, 1.0),
        ("journal_unavailable", 503, 2.0),
        ("deadline_exceeded", 504, None),
        ("worker_failed", 500, None),
        ("retries_exhausted", 500, None),
        ("duplicate_id", 400, None),
        ("too_many_items", 413, None),
        ("unknown_model", 404, None),
        ("unknown_model_while_starting", 503, 0.5),
    ],
)
def test_job_errors_map_to_http(code: str, status: int, retry: float | None) -> None:
    hints = {"busy": 250, "journal_unavailable": 2000, "unknown_model_while_starting": 500}
    # the broker serves no model yet: unknown_model with a hint, which means "not now"
    error = {"code": code.removesuffix("_while_starting"), "message": "why"}
    if code in hints:
        error["retry_after_ms"] = hints[code]
    e = job_error(error)
    assert (e.status, e.retry_after_s) == (status, retry)
    assert e.body()["error"]["message"] == "why"
