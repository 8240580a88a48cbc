"""Client-side CLI commands: `baton submit`, `baton status`, `baton cancel`.

Exit status: 0 when the broker answered (for submit: every job got a row, ok or error), 1 when
it could not be reached in time or jobs were left unanswered, 2 for unusable arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import IO

from tqdm import tqdm

from broker.client import Client, failure
from broker.protocol import Code, ProtocolError


def submit(
    endpoint: str, input_path: str, output_path: str, window: int = 512, timeout: float = 60
) -> int:
    if window < 1:
        return _fail("submit", "--window must be at least 1", 2)
    try:
        total = None if input_path == "-" else _count_lines(input_path)
        with _open(input_path, "r") as src, _open(output_path, "w") as dst:
            return asyncio.run(_submit(endpoint, src, dst, total, window, timeout))
    except OSError as e:
        return _fail("submit", str(e), 2)


async def _submit(
    endpoint: str, src: IO[str], dst: IO[str], total: int | None, window: int, timeout: float
) -> int:
    def write(row: dict) -> None:
        dst.write(json.dumps(row) + "\n")
        dst.flush()
        bar.update()

    sent: set[str] = set()
    answered = 0
    with tqdm(total=total, unit="job", file=sys.stderr, mininterval=0.5) as bar:
        async with Client(endpoint, timeout_s=timeout) as client:
            try:
                async for result in client.run(_jobs(src, sent, write), window):
                    write(result.to_json())
                    answered += 1
            except TimeoutError as e:
                bar.close()
                left = len(sent) - answered
                return _fail("submit", f"{e}; {left} jobs left unanswered", 1)
    return 0


def _jobs(src: IO[str], sent: set[str], reject: Callable[[dict], None]) -> Iterator[dict]:
    """Jobs to send; a line that cannot be one gets its error row at once and is not sent."""
    for n, line in enumerate(src, 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except ValueError as e:
            reject(failure(f"line-{n}", Code.MALFORMED, f"line {n}: not JSON: {e}").to_json())
            continue
        problem = _problem(job, n)
        if problem is not None:
            job_id = job.get("id") if isinstance(job, dict) else None
            row_id = job_id if isinstance(job_id, str) and job_id else f"line-{n}"
            reject(failure(row_id, Code.BAD_FIELD, problem).to_json())
            continue
        if job["id"] in sent:
            # one row per line: the repeat gets its own error row, the first runs
            reject(failure(job["id"], Code.DUPLICATE_ID, f"line {n}: id repeats").to_json())
            continue
        sent.add(job["id"])
        yield job


def _problem(job: object, n: int) -> str | None:
    # checked here, not by the broker, so one bad line cannot fail a whole submit message
    if not isinstance(job, dict):
        return f"line {n}: a job must be a JSON object"
    if not isinstance(job.get("id"), str) or not job["id"]:
        return f"line {n}: field 'id' must be a non-empty string"
    if not isinstance(job.get("text"), str):
        return f"line {n}: field 'text' must be a string"
    for key in ("task", "model"):
        if key in job and not isinstance(job[key], str):
            return f"line {n}: field {key!r} must be a string"
    return None


def status(endpoint: str, as_json: bool = False, timeout: float = 5) -> int:
    try:
        body = asyncio.run(_ask(endpoint, timeout, lambda c: c.status()))
    except (TimeoutError, ProtocolError) as e:
        return _fail("status", _why(e), 1)
    print(json.dumps(body) if as_json else table(body))
    return 0


def table(body: dict) -> str:
    """The status reply, for people."""
    layout = body.get("layout") or {}
    jobs = body.get("jobs") or {}
    lines = [
        f"model   {body.get('model')}",
        f"layout  tensor {layout.get('tensor')} x pipeline {layout.get('pipeline')}",
        "jobs    " + "  ".join(f"{k} {v}" for k, v in jobs.items()),
        "",
    ]
    cols = ["rank", "pid", "stage", "tp_rank", "device", "state", "restarts"]
    rows = [cols] + [[str(w.get(c, "")) for c in cols] for w in body.get("workers") or []]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def cancel(endpoint: str, ids: list[str], timeout: float = 10) -> int:
    try:
        body = asyncio.run(_ask(endpoint, timeout, lambda c: c.cancel(ids)))
    except (TimeoutError, ProtocolError) as e:
        return _fail("cancel", _why(e), 1)
    print("cancelled: " + (" ".join(body["ids"]) or "-"))
    print("unknown:   " + (" ".join(body["unknown"]) or "-"))
    return 0


async def _ask(endpoint: str, timeout: float, call: Callable[[Client], Awaitable[dict]]) -> dict:
    async with Client(endpoint, timeout_s=timeout) as client:
        return await call(client)


def _why(e: Exception) -> str:
    if isinstance(e, ProtocolError):
        return f"broker refused: {e.code}: {e.message}"
    return str(e)


def _fail(command: str, message: str, code: int) -> int:
    print(f"baton {command}: {message}", file=sys.stderr)
    return code


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


@contextlib.contextmanager
def _open(path: str, mode: str) -> Iterator[IO[str]]:
    if path == "-":
        yield sys.stdin if mode == "r" else sys.stdout
        return
    # undecodable input bytes become U+FFFD rather than ending the run mid-file
    with open(path, mode, encoding="utf-8", errors="replace") as f:
        yield f
