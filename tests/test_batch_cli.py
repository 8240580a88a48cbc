"""`baton batch`: OpenAI batch output lines equal to the HTTP route's answers (against the live
embedding fleet); flat memory on a 200,000-line file and resuming by custom_id after SIGKILL
(against a stand-in broker, so that the client's own memory and resubmissions are what is
measured, at a rate a model would not reach in a test)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import torch
import zmq
from test_gateway import MODEL, call

from baton.launch import REPO, Fleet
from wire.protocol import encode

WAIT_S = 180
DIM = 8  # the stand-in's embeddings: small, so the output file stays small


def embed_line(custom_id: str, text: str) -> str:
    body = {"model": MODEL, "input": text, "encoding_format": "float"}
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body}
    return json.dumps(line) + "\n"


class StandIn:
    """A broker stand-in on a ROUTER: every submit is accepted and each job answered at once
    with a DIM-float row, until `hold` is set (then jobs are accepted and never answered). It
    records every job id it was sent."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.ids: list[str] = []
        self.hold = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sock.close(0)
        self.ctx.term()

    def _serve(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(100):
                continue
            peer, header, *_ = self.sock.recv_multipart()
            msg = msgpack.unpackb(header)
            ref = msg.get("ref")
            if msg["kind"] != "submit":
                self.sock.send_multipart([peer, *encode("pong", {"ref": ref})])
                continue
            ids = [j["id"] for j in msg["jobs"]]
            self.ids += ids
            self.sock.send_multipart([peer, *encode("accepted", {"ref": ref, "ids": ids})])
            if self.hold.is_set():
                continue
            entries = [
                {"id": i, "status": "ok", "tokens": 3, "truncated": False, "row": k}
                for k, i in enumerate(ids)
            ]
            rows = torch.full((len(ids), DIM), 0.5)
            self.sock.send_multipart([peer, *encode("results", {"results": entries}, [rows])])


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    s = StandIn()
    try:
        yield s
    finally:
        s.close()


def command(endpoint: str, src: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "baton.cli",
        "batch",
        "--endpoint",
        endpoint,
        "--input",
        str(src),
        "--output",
        str(out),
        "--timeout",
        str(WAIT_S),
        *extra,
    ]


def peak_rss_mb(cmd: list[str]) -> float:
    """Run to the end; the process's own peak resident memory (wait4's rusage, this child's)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        if proc.returncode is None and proc.poll() is None:
            proc.kill()
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0
    return usage.ru_maxrss / 1024  # KiB on Linux


def write_lines(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(embed_line(f"line-{i}", f"text {i}"))


def test_lines_equal_the_http_route(small_fleet: Fleet, tmp_path: Path) -> None:
    src, out, err = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    texts = ["a first sentence", "and a second one", "word"]
    src.write_text("".join(embed_line(f"c{i}", t) for i, t in enumerate(texts)) + "{broken\n")
    cmd = command(small_fleet.endpoint, src, out, "--errors", str(err))
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=WAIT_S)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["custom_id"] for r in rows] == ["c0", "c1", "c2"]
    for text, row in zip(texts, rows, strict=True):
        body = {"model": MODEL, "input": text, "encoding_format": "float"}
        status, _, want = call(small_fleet.http, "POST", "/v1/embeddings", body)
        assert status == 200 and row["response"]["body"] == want
    [bad] = [json.loads(x) for x in err.read_text().splitlines()]
    assert bad["custom_id"] is None and bad["error"]["code"] == "invalid_json_line"


def test_memory_stays_flat(stand_in: StandIn, tmp_path: Path) -> None:
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    write_lines(small, 2_000)
    write_lines(big, 200_000)
    base = peak_rss_mb(command(stand_in.endpoint, small, tmp_path / "small.out"))
    peak = peak_rss_mb(command(stand_in.endpoint, big, tmp_path / "big.out"))
    with (tmp_path / "big.out").open("rb") as f:
        assert sum(1 for _ in f) == 200_000
    # the file is 100 times longer: holding its lines, answers or custom_ids would cost well
    # over 50 MB (the input alone is 23 MB of text, the output 30 MB)
    assert peak - base < 25, f"peak RSS {peak:.0f} MB on 200,000 lines, {base:.0f} MB on 2,000"


def test_resumes_by_custom_id_after_sigkill(stand_in: StandIn, tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    n = 3_000
    write_lines(src, n)
    proc = subprocess.Popen(
        command(stand_in.endpoint, src, out, "--window", "64"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + WAIT_S
        while not out.exists() or out.stat().st_size < 100_000:  # some hundreds of lines
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)  # polling a file's growth, with a bound
        stand_in.hold.set()  # what is sent from here on is never answered
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
    with out.open("ab") as f:
        f.write(b'{"id": "batch_req_cut", "custom_id": "li')  # as if the kill came mid-line
    kept = [json.loads(x)["custom_id"] for x in out.read_text().splitlines()[:-1]]
    assert 0 < len(kept) < n
    stand_in.hold.clear()
    sent_before = len(stand_in.ids)
    run = subprocess.run(
        command(stand_in.endpoint, src, out), cwd=REPO, capture_output=True, timeout=WAIT_S
    )
    assert run.returncode == 0, run.stderr
    ids = [json.loads(x)["custom_id"] for x in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"line-{i}" for i in range(n))  # each once, the cut line gone
    # the lines already answered were not sent again; each other line went once
    again = stand_in.ids[sent_before:]
    assert len(again) == n - len(kept) == len(set(again))
