"""The Batch API with the official `openai` package against a live `baton up`: a round trip
(upload, create, poll, output and error files, list) whose lines equal what the HTTP route
answers, a cancel, and SIGKILL of the whole fleet mid-batch with a restart on the same journal:
the batch completes, every custom_id once, and nothing that had finished runs again."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from conftest import start
from test_gateway import MODEL, call, oai

from baton.launch import Fleet

WAIT_S = 180
OVER = ("completed", "failed", "cancelled", "expired")


def jsonl(rows: list[dict | str]) -> bytes:
    return b"".join((r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in rows)


def embed_line(custom_id: str, text: str | list[str] | list[int]) -> dict:
    body = {"model": MODEL, "input": text, "encoding_format": "float"}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body}


def wait_for(
    client: openai.OpenAI, batch_id: str, done: Callable[[openai.types.Batch], bool]
) -> openai.types.Batch:
    """Poll the batch (bounded) until `done` holds."""
    deadline = time.monotonic() + WAIT_S
    while True:
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch}"
        time.sleep(0.2)  # polling a state with a bound, not synchronising on time


def submit(client: openai.OpenAI, data: bytes) -> openai.types.Batch:
    up = client.files.create(file=("batch.jsonl", io.BytesIO(data)), purpose="batch")
    assert up.purpose == "batch" and up.bytes == len(data)
    return client.batches.create(
        input_file_id=up.id, endpoint="/v1/embeddings", completion_window="24h"
    )


def rows(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def test_round_trip(small_fleet: Fleet) -> None:
    client = oai(small_fleet)
    good = [embed_line(f"ok-{i}", f"sentence number {i} of the batch") for i in range(5)]
    good.append(embed_line("two", ["first of two", "second of two"]))
    good.append(embed_line("ids", [101, 2023, 2003, 1037, 6251, 102]))  # the model's token ids
    bad = [
        "{not json",
        {"method": "POST", "url": "/v1/embeddings", "body": {"model": MODEL, "input": "x"}},
        embed_line("ok-1", "a repeated custom_id"),
        {**embed_line("wrong-url", "x"), "url": "/v1/nothing"},
        {**embed_line("bad-body", "x"), "body": {"model": MODEL, "input": 7}},
    ]
    created = submit(client, jsonl([*good[:3], *bad, *good[3:]]))
    assert created.status == "validating" and created.request_counts.total == 0
    batch = wait_for(client, created.id, lambda b: b.status in OVER)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed) == (12, 7)
    assert batch.request_counts.failed == 5
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at

    out = rows(client, batch.output_file_id)
    assert [r["custom_id"] for r in out] == [g["custom_id"] for g in good]  # input order
    for line, row in zip(good, out, strict=True):
        assert row["error"] is None and row["response"]["status_code"] == 200
        assert row["id"].startswith("batch_req_") and row["response"]["request_id"]
        # what the HTTP route answers for the same body
        status, _, want = call(small_fleet.http, "POST", "/v1/embeddings", line["body"])
        assert status == 200 and row["response"]["body"] == want

    errors = {r["custom_id"]: r for r in rows(client, batch.error_file_id)}
    assert len(errors) == 4  # the two lines without a custom_id share None
    assert errors[None]["response"] is None
    assert errors[None]["error"]["code"] in ("invalid_json_line", "invalid_custom_id")
    assert errors["ok-1"]["error"]["code"] == "duplicate_custom_id"
    assert errors["wrong-url"]["error"]["code"] == "invalid_url"
    body = errors["bad-body"]["response"]
    assert body["status_code"] == 400 and body["body"]["error"]["param"] == "input"

    listed = client.batches.list(limit=100)
    assert created.id in [b.id for b in listed.data]
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"


def test_bad_requests(small_fleet: Fleet) -> None:
    client = oai(small_fleet)
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file-none", endpoint="/v1/embeddings", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_none")
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    # a file without one request line: the batch fails, saying why
    empty = submit(client, b"\n\n")
    failed = wait_for(client, empty.id, lambda b: b.status in OVER)
    assert failed.status == "failed" and failed.errors.data[0].code == "empty_file"


def test_cancel_keeps_what_finished(small_fleet: Fleet) -> None:
    client = oai(small_fleet)
    n = 600
    created = submit(client, jsonl([embed_line(f"c-{i}", f"text {i}") for i in range(n)]))
    wait_for(client, created.id, lambda b: b.request_counts.completed > 0)
    cancelling = client.batches.cancel(created.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = wait_for(client, created.id, lambda b: b.status in OVER)
    assert batch.status == "cancelled" and batch.cancelled_at
    out = rows(client, batch.output_file_id)
    ids = [r["custom_id"] for r in out]
    assert 0 < len(ids) < n and len(set(ids)) == len(ids)
    assert batch.request_counts.completed == len(ids)
    assert all(r["response"]["status_code"] == 200 for r in out)
    # a batch that has completed cannot be cancelled
    one = submit(client, jsonl([embed_line("one", "one line")]))
    wait_for(client, one.id, lambda b: b.status in OVER)
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(one.id)


def test_sigkill_mid_batch_and_restart(tmp_path: Path) -> None:
    journal, log = tmp_path / "journal.sqlite3", tmp_path / "executions.log"
    sets = (f'journal.path="{journal}"', f'jobs.execution_log="{log}"')
    n = 400
    data = jsonl([embed_line(f"k-{i}", f"kill test text number {i}") for i in range(n)])
    first = start(*sets, gateway=True)
    try:
        client = oai(first)
        created = submit(client, data)
        wait_for(client, created.id, lambda b: b.request_counts.completed >= 64)
        os.killpg(first.proc.pid, signal.SIGKILL)  # broker, gateway, controller, workers
    finally:
        first.stop()
    db = sqlite3.connect(journal)
    done = {r[0] for r in db.execute("SELECT id FROM jobs WHERE state='done'")}
    db.close()
    before = log.read_text().split("\n")[:-1]  # a line cut off by the kill is not counted
    assert done, "nothing had finished before the kill"

    second = start(*sets, gateway=True)
    try:
        client = oai(second)
        batch = wait_for(client, created.id, lambda b: b.status in OVER)
        assert batch.status == "completed", batch
        assert batch.request_counts.completed == n and batch.request_counts.failed == 0
        out = rows(client, batch.output_file_id)
    finally:
        second.stop()
    assert sorted(r["custom_id"] for r in out) == sorted(f"k-{i}" for i in range(n))
    assert all(r["response"]["status_code"] == 200 for r in out)
    rerun = set(log.read_text().split("\n")[len(before) :]) - {""}
    assert not rerun & done, f"ran again after it was done: {sorted(rerun & done)[:5]}"
