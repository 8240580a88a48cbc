"""The client keeps going: one bad input line, or one job that cannot be encoded, fails alone.

Offline against the scripted peer of test_client_offline (the client is what is tested), and
through the real `baton submit` against a real fleet.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from corpus import reference
from test_client_offline import Peer, broker_like, vector

from baton.cli import main
from baton.client import Client
from baton.launch import REPO, Fleet

GOOD = ["The quick brown fox.", "A queue of jobs and a fleet of workers.", "Grüße aus Köln 😀"]


def lines() -> tuple[bytes, dict[str, str]]:
    """An input file mixing good lines with every kind of bad one, and the code each bad line's
    row must carry (by row id)."""
    rows = [
        json.dumps({"id": "g0", "task": "embed", "text": GOOD[0]}).encode(),
        b'{"id": "bad-utf8", "task": "embed", "text": "caf\xe9 \xff"}',  # Latin-1, not UTF-8
        json.dumps({"id": "g1", "task": "embed", "text": GOOD[1]}).encode(),
        b'{"id": "surrogate", "task": "embed", "text": "lone \\ud800 half"}',
        b'{"id": "\\udfff-id", "task": "embed", "text": "a bad id"}',
        b'{"id": "deep", "task": "embed", "text": "ok", "model": "\\ud83d"}',
        b'{"id": "no-text", "task": "embed"}',
        b"not json at all",
        # ensure_ascii=False: real UTF-8 bytes for the umlauts and the emoji
        json.dumps({"id": "g2", "task": "embed", "text": GOOD[2]}, ensure_ascii=False).encode(),
    ]
    expect = {
        "line-2": "malformed",  # undecodable: its id cannot be trusted either
        "surrogate": "bad_field",
        "line-5": "bad_field",  # the id itself is not valid Unicode
        "deep": "bad_field",
        "no-text": "bad_field",
        "line-8": "malformed",
    }
    return b"\n".join(rows) + b"\n", expect


def check_rows(out: Path, expect: dict[str, str]) -> dict[str, dict]:
    text = out.read_text(encoding="utf-8")
    text.encode("ascii")  # rows are plain JSON: nothing unencodable can reach the output
    rows = {r["id"]: r for r in map(json.loads, text.splitlines())}
    assert set(rows) == {"g0", "g1", "g2", *expect}, sorted(rows)
    for row_id, code in expect.items():
        assert rows[row_id]["status"] == "error" and rows[row_id]["error"]["code"] == code, rows[
            row_id
        ]
    return rows


def test_submit_offline_bad_lines_fail_alone(tmp_path: Path, capsys) -> None:
    data, expect = lines()
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(data)
    with Peer(broker_like) as peer:
        rc = main(
            ["submit", "--endpoint", peer.endpoint, "--input", str(src), "--output", str(dst)]
        )
        sent = sorted(j["id"] for s in peer.submits() for j in s)
    assert rc == 0, capsys.readouterr().err
    rows = check_rows(dst, expect)
    assert sent == ["g0", "g1", "g2"]  # no bad line reached the wire
    for i, t in enumerate(GOOD):
        assert rows[f"g{i}"]["embedding"] == vector(t)  # the text arrived intact, emoji too
    assert "line 2: not UTF-8" in rows["line-2"]["error"]["message"]


def test_submit_from_stdin_reads_bytes(tmp_path: Path) -> None:
    data, expect = lines()
    dst = tmp_path / "out.jsonl"
    with Peer(broker_like) as peer:
        done = subprocess.run(
            [sys.executable, "-m", "baton.cli", "submit", "--endpoint", peer.endpoint]
            + ["--input", "-", "--output", str(dst)],
            input=data,
            capture_output=True,
            cwd=REPO,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    check_rows(dst, expect)


async def test_library_unencodable_job_fails_alone() -> None:
    jobs = [
        {"id": "a", "task": "embed", "text": "fine"},
        {"id": "b", "task": "embed", "text": "broken \ud800 text"},
        {"id": "c", "task": "embed", "text": "also fine", "model": {"\udc80": 1}},
        {"id": "d", "task": "embed", "text": "still fine", "deadline_ms": 2**80},
        {"id": "e", "task": "embed", "text": "and fine"},
    ]
    with Peer(broker_like) as peer:
        async with Client(peer.endpoint, timeout_s=30) as client:
            results = [await f for f in await client.submit(jobs)]
        sent = sorted(j["id"] for s in peer.submits() for j in s)
    by = {r.id: r for r in results}
    assert sent == ["a", "e"]
    assert by["a"].ok and by["e"].ok and by["a"].embedding == vector("fine")
    for bad, field in (("b", "text"), ("c", "model"), ("d", "deadline_ms")):
        assert by[bad].error["code"] == "bad_field" and field in by[bad].error["message"]


def test_submit_through_a_real_fleet(small_fleet: Fleet, tmp_path: Path) -> None:
    data, expect = lines()
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-m", "baton.cli", "submit", "--endpoint", small_fleet.endpoint]
        + ["--input", str(src), "--output", str(dst)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = check_rows(dst, expect)
    got = torch.tensor([rows[f"g{i}"]["embedding"] for i in range(len(GOOD))])
    sims = torch.nn.functional.cosine_similarity(got, reference(GOOD), dim=-1)
    assert sims.min().item() >= 0.9999
