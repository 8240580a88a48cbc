"""`baton batch`: an OpenAI batch file (`{"custom_id", "method", "url", "body"}` lines) run
through the broker's client endpoint, as `baton submit` runs a job file, its answers written as
OpenAI's batch output lines (each `body` what the gateway's HTTP route answers).

Streaming: the input is read line by line and at most `window` lines are in flight; their
outcomes are written in input order. The custom_ids answered so far live in a temporary
SQLite file, not in memory, so memory stays flat however long the file.

Resumable by custom_id: lines whose custom_id already has a line in the output (or error) file
are skipped, and a last line cut off by a kill is cut away first. A line's job ids are a digest
of its custom_id and body, so a line that had finished at the broker when the run was stopped
gets the broker's stored result back without running again (within `journal.result_ttl_s`).

Exit status: 0 when every line has its answer, 1 when the broker was silent for `--timeout`
(run it again: it resumes), 2 for unusable arguments or files.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from baton.client import Client
from baton.commands import Keys, _fail
from broker.batch_lines import Line, Outcome, Request, Window, custom_id_of, line_error, lines, read
from broker.texts import Texts


class Answered:
    """The custom_ids met so far: answered in an earlier run (`done`) or read in this one, in a
    temporary on-disk SQLite database (SQLite's "" file) rather than a growing set."""

    def __init__(self) -> None:
        self.db = sqlite3.connect("")
        self.db.execute("CREATE TABLE ids (custom_id TEXT PRIMARY KEY, done INTEGER) WITHOUT ROWID")
        self.without_id = 0  # lines of earlier runs' output that had no custom_id to name

    def close(self) -> None:
        self.db.close()

    def scan(self, path: Path) -> None:
        """Take in an output file of an earlier run, cutting away a last line cut short."""
        if not path.exists():
            return
        with path.open("r+b") as f:
            good = 0
            for n, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    break  # the kill came mid-line: that line is written again
                try:
                    custom_id = json.loads(raw)["custom_id"]
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{path} line {n} is not a batch output line") from None
                if isinstance(custom_id, str):
                    self.db.execute("INSERT OR IGNORE INTO ids VALUES (?, 1)", (custom_id,))
                else:
                    self.without_id += 1
                good += len(raw)
            f.truncate(good)

    def state(self, custom_id: str) -> str:
        """ "done" (answered before), "repeat" (read earlier in this run) or "new" (now read)."""
        row = self.db.execute("SELECT done FROM ids WHERE custom_id = ?", (custom_id,)).fetchone()
        if row is None:
            self.db.execute("INSERT INTO ids VALUES (?, 0)", (custom_id,))
            return "new"
        return "done" if row[0] else "repeat"


def batch(
    endpoint: str,
    input_path: str,
    output_path: str,
    errors_path: str | None = None,
    window: int = 256,
    timeout: float = 60,
    keys: Keys | None = None,
    model_dir: str | None = None,
) -> int:
    if window < 1:
        return _fail("batch", "--window must be at least 1", 2)
    out_path = Path(output_path)
    err_path = Path(errors_path) if errors_path else out_path
    answered = Answered()
    try:
        texts = Texts(Path(model_dir) if model_dir else None, None)
        for path in dict.fromkeys((out_path, err_path)):
            answered.scan(path)
        with open(input_path, "rb") as src:
            total = sum(1 for _ in lines(src))
        with contextlib.ExitStack() as files:
            src = files.enter_context(open(input_path, "rb"))
            out = files.enter_context(out_path.open("ab"))
            err = out if err_path == out_path else files.enter_context(err_path.open("ab"))
            client = (keys or Keys()).client(endpoint, timeout)
            return asyncio.run(_run(client, src, out, err, answered, texts, total, window))
    except (OSError, ValueError) as e:  # ValueError: an unusable key file or output file
        return _fail("batch", str(e), 2)
    finally:
        answered.close()


async def _run(
    client: Client,
    src: IO[bytes],
    out: IO[bytes],
    err: IO[bytes],
    answered: Answered,
    texts: Texts,
    total: int,
    window: int,
) -> int:
    with tqdm(total=total, unit="line", file=sys.stderr, mininterval=0.5) as bar:
        async with client:
            run = Window(client, window, texts)
            try:
                async for _, outcome in run.run(_requests(lines(src), answered, texts, bar)):
                    (out if outcome.ok else err).write(outcome.line())
                    (out if outcome.ok else err).flush()
                    bar.update()
            except TimeoutError as e:
                bar.close()
                return _fail("batch", f"{e}; run the same command again to resume", 1)
    return 0


def _requests(
    source: Iterator[Line], answered: Answered, texts: Texts, bar: tqdm
) -> Iterator[tuple[Line, Request | Outcome]]:
    for line in source:
        obj, custom_id, bad = custom_id_of(line.raw)
        if bad is not None:
            if answered.without_id:  # an earlier run wrote this line's error already
                answered.without_id -= 1
                bar.update()
                continue
            yield line, bad
            continue
        assert obj is not None and custom_id is not None
        state = answered.state(custom_id)
        if state == "done":
            bar.update()
            continue
        if state == "repeat":
            why = f"line {line.number + 1}: custom_id {custom_id!r} repeats an earlier line's"
            yield line, line_error(custom_id, "duplicate_custom_id", why)
            continue
        yield line, read(obj, custom_id, None, _job_prefix(custom_id, obj.get("body")), texts)


def _job_prefix(custom_id: str, body: Any) -> str:
    """The same line (custom_id and body) gets the same job ids in every run."""
    canonical = json.dumps([custom_id, body], sort_keys=True, separators=(",", ":"))
    return "bb-" + hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()
