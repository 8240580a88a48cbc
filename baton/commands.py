"""Client-side CLI commands: `baton submit`, `baton status`, `baton cancel`, `baton keys`.

Exit status: 0 when the broker answered (for submit: every job got a row, ok or error), 1 when
it could not be reached in time or jobs were left unanswered, 2 for unusable arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from baton.client import Client, failure
from wire.protocol import Code, ProtocolError, encodable


@dataclass(frozen=True, slots=True)
class Keys:
    """`--key` (our secret certificate) and `--server-key` (the broker's public one)."""

    key: str | None = None
    server_key: str | None = None

    def client(self, endpoint: str, timeout: float) -> Client:
        return Client(endpoint, timeout_s=timeout, curve_key=self.key, server_key=self.server_key)


def submit(
    endpoint: str,
    input_path: str,
    output_path: str,
    window: int = 512,
    timeout: float = 60,
    keys: Keys = Keys(),
) -> int:
    if window < 1:
        return _fail("submit", "--window must be at least 1", 2)
    try:
        total = None if input_path == "-" else _count_lines(input_path)
        with _open_in(input_path) as src, _open(output_path, "w") as dst:
            return asyncio.run(_submit(endpoint, src, dst, total, window, timeout, keys))
    except (OSError, ValueError) as e:  # ValueError: an unusable key file
        return _fail("submit", str(e), 2)


async def _submit(
    endpoint: str,
    src: IO[bytes],
    dst: IO[str],
    total: int | None,
    window: int,
    timeout: float,
    keys: Keys = Keys(),
) -> int:
    def write(row: dict) -> None:
        dst.write(json.dumps(row) + "\n")
        dst.flush()
        bar.update()

    sent: set[str] = set()
    answered = 0
    with tqdm(total=total, unit="job", file=sys.stderr, mininterval=0.5) as bar:
        async with keys.client(endpoint, timeout) as client:
            try:
                async for result in client.run(_jobs(src, sent, write), window):
                    write(result.to_json())
                    answered += 1
            except TimeoutError as e:
                bar.close()
                left = len(sent) - answered
                return _fail("submit", f"{e}; {left} jobs left unanswered", 1)
    return 0


def _jobs(src: IO[bytes], sent: set[str], reject: Callable[[dict], None]) -> Iterator[dict]:
    """Jobs to send; a line that cannot be one gets its error row at once and is not sent."""
    for n, raw in enumerate(src, 1):
        if not raw.strip():
            continue
        try:
            # strict, line by line: one undecodable line is that line's error, not the file's
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            why = f"line {n}: not UTF-8: byte {raw[e.start]:#04x} at offset {e.start}"
            reject(failure(f"line-{n}", Code.MALFORMED, why).to_json())
            continue
        try:
            job = json.loads(line)
        except ValueError as e:
            reject(failure(f"line-{n}", Code.MALFORMED, f"line {n}: not JSON: {e}").to_json())
            continue
        problem = _problem(job, n)
        if problem is not None:
            job_id = job.get("id") if isinstance(job, dict) else None
            row_id = (
                job_id if isinstance(job_id, str) and job_id and encodable(job_id) else f"line-{n}"
            )
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
    # JSON escapes can spell what UTF-8 cannot ("\ud800"): such a string cannot be sent
    bad = next((k for k, v in _strings(job) if not encodable(v)), None)
    if bad is not None:
        return f"line {n}: field {bad!r} is not valid Unicode (a lone surrogate)"
    if not isinstance(job.get("id"), str) or not job["id"]:
        return f"line {n}: field 'id' must be a non-empty string"
    if job.get("task") in ("generate", "embed") and "token_ids" in job:
        # an input of token ids; the broker checks them (and that there is no text too)
        if not isinstance(job["token_ids"], list):
            return f"line {n}: field 'token_ids' must be a list of integers"
    elif not isinstance(job.get("text"), str):
        return f"line {n}: field 'text' must be a string"
    for key in ("task", "model"):
        if key in job and not isinstance(job[key], str):
            return f"line {n}: field {key!r} must be a string"
    return None


def _strings(value: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """(field, string) for every string in a JSON value, keys included, however deep."""
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k, str(k))
            yield from _strings(v, k if isinstance(k, str) and encodable(k) else key)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v, key)


def status(endpoint: str, as_json: bool = False, timeout: float = 5, keys: Keys = Keys()) -> int:
    try:
        body = asyncio.run(_ask(endpoint, timeout, lambda c: c.status(), keys))
    except (TimeoutError, ProtocolError) as e:  # before OSError, which TimeoutError is
        return _fail("status", _why(e), 1)
    except (OSError, ValueError) as e:  # an unusable key file
        return _fail("status", str(e), 2)
    print(json.dumps(body) if as_json else table(body))
    return 0


def table(body: dict) -> str:
    """The status reply, for people."""
    layout = body.get("layout") or {}
    jobs = body.get("jobs") or {}
    lines = [
        f"model   {body.get('model')}",
        f"layout  tensor {layout.get('tensor')} x pipeline {layout.get('pipeline')}"
        + "".join(
            f"  stage {i}: layers {a}-{b}" for i, (a, b) in enumerate(layout.get("stages") or [])
        ),
        "jobs    " + "  ".join(f"{k} {v}" for k, v in jobs.items()),
    ]
    for c in body.get("controllers") or []:
        lines += _generation_lines(c)
    if body.get("pool_bytes"):
        lines.append(f"pool    {_mb(body['pool_bytes'])} of weights in shared memory, once a host")
    lines.append("")
    cols = ["replica", "rank", "pid", "stage", "tp_rank", "device", "state", "restarts"]
    cols += ["weights", "pooled", "in the pool"]
    rows = [cols] + [
        [str(w.get(c, "")) for c in cols[:-3]]
        + [_mb(w.get("resident_weight_bytes")), _mb(w.get("pooled_weight_bytes"))]
        + [_units(w.get("pooled_units"))]
        for w in body.get("workers") or []
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _units(units: object) -> str:
    """A worker's pooled units, its layers by number: "embed, layers 1 3 5"."""
    if not isinstance(units, list):
        return ""
    layers = [u.removeprefix("layers.") for u in units if u.startswith("layers.")]
    rest = [u for u in units if not u.startswith("layers.")]
    return ", ".join(rest + ([f"layers {' '.join(layers)}"] if layers else []))


def _mb(n: object) -> str:
    return f"{n / 2**20:.1f} MB" if isinstance(n, int) else ""


def _generation_lines(controller: dict) -> list[str]:
    """A decoder controller's KV blocks and sequences; nothing for an encoder's (no "kv")."""
    stats = controller.get("stats") or {}
    kv = stats.get("kv")
    if not isinstance(kv, dict):
        return []
    pid = controller.get("pid")
    return [
        f"kv      controller {pid}: blocks used {kv.get('blocks_used')}  free "
        f"{kv.get('blocks_free')}  total {kv.get('blocks_total')} ({kv.get('block_size')} "
        f"tokens each); cached prefixes {kv.get('blocks_cached')} blocks, "
        f"{kv.get('prefix_hits_tokens')} prompt tokens served from them",
        f"seqs    controller {pid}: waiting {stats.get('waiting')}  running "
        f"{stats.get('running')}  preemptions {stats.get('preemptions')}",
    ]


def cancel(endpoint: str, ids: list[str], timeout: float = 10, keys: Keys = Keys()) -> int:
    try:
        body = asyncio.run(_ask(endpoint, timeout, lambda c: c.cancel(ids), keys))
    except (TimeoutError, ProtocolError) as e:  # before OSError, which TimeoutError is
        return _fail("cancel", _why(e), 1)
    except (OSError, ValueError) as e:  # an unusable key file
        return _fail("cancel", str(e), 2)
    print("cancelled: " + (" ".join(body["ids"]) or "-"))
    print("unknown:   " + (" ".join(body["unknown"]) or "-"))
    return 0


async def _ask(
    endpoint: str, timeout: float, call: Callable[[Client], Awaitable[dict]], keys: Keys = Keys()
) -> dict:
    async with keys.client(endpoint, timeout) as client:
        return await call(client)


def make_keys(directory: str, name: str) -> int:
    """`baton keys DIR --name NAME`: a CURVE key pair, DIR/NAME.key (public, to hand out or put
    in the broker's allow-list) and DIR/NAME.key_secret (readable by its owner only)."""
    import zmq.auth

    out = Path(directory)
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    if public.exists() or secret.exists():
        return _fail("keys", f"{public} or {secret} exists; not overwriting a key", 2)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # the secret file is created 0600 from the start, not chmod-ed after being readable
        old = os.umask(0o077)
        try:
            zmq.auth.create_certificates(out, name)
        finally:
            os.umask(old)
        public.chmod(0o644)
    except OSError as e:
        return _fail("keys", str(e), 2)
    print(f"public  {public}\nsecret  {secret}")
    return 0


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
def _open_in(path: str) -> Iterator[IO[bytes]]:
    """The input as bytes: each line is decoded on its own, strictly, by `_jobs`."""
    if path == "-":
        yield sys.stdin.buffer
        return
    with open(path, "rb") as f:
        yield f


@contextlib.contextmanager
def _open(path: str, mode: str) -> Iterator[IO[str]]:
    if path == "-":
        yield sys.stdin if mode == "r" else sys.stdout
        return
    # rows are json.dumps'd (ASCII), so nothing written here can fail to encode
    with open(path, mode, encoding="utf-8") as f:
        yield f
