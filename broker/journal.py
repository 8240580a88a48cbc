"""The broker's durable job journal: SQLite in WAL mode, written by one thread, group-committed.

Every accepted job is written before the client hears "accepted"; its end (result or error) is
written when it finishes; finished jobs are kept for `result_ttl_s` so a resubmitted id gets its
stored result. On start the broker reads back every job that had not finished and runs it again.

Durability (`journal.durability`):
- `sync`:  PRAGMA synchronous=FULL; an accepted job survives a power loss.
- `batch`: PRAGMA synchronous=NORMAL (WAL); an accepted job survives any crash of Baton's
           processes, not of the machine. The default.
- `off`:   the client hears "accepted" before the write reaches the database.
In every mode writes are group-committed: whatever accumulates while one commit runs goes into
the next, so throughput does not collapse to one fsync per job.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    task TEXT NOT NULL,
    text TEXT NOT NULL,
    deadline REAL,              -- wall-clock seconds; NULL = none
    attempts INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,        -- queued | done | failed | cancelled (running is not journaled)
    finished REAL,              -- wall-clock seconds
    entry BLOB,                 -- msgpack of the final `results` entry
    embedding BLOB,             -- raw float32 row, for ok jobs with a vector
    owner TEXT                  -- the submitter's CURVE key (z85); NULL on an open endpoint
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
"""

MODES = {"sync": "FULL", "batch": "NORMAL", "off": "OFF"}


@dataclass(slots=True)
class Row:
    """A job as the journal holds it."""

    id: str
    model: str
    task: str
    text: str
    deadline: float | None
    attempts: int
    state: str
    entry: dict[str, Any] | None
    embedding: torch.Tensor | None
    owner: str | None = None


class Journal:
    def __init__(self, path: str, durability: str = "batch", result_ttl_s: float = 3600.0) -> None:
        if durability not in MODES:
            raise ValueError(
                f"journal.durability must be one of {', '.join(MODES)}, got {durability!r}"
            )
        self.path, self.durability, self.ttl = path, durability, result_ttl_s
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={MODES[durability]}")
        self.db.executescript(SCHEMA)
        _migrate(self.db)
        # reads come from the event loop while the writer thread commits: a connection each
        self.reader = sqlite3.connect(path, check_same_thread=False)
        # one writer thread: SQLite serialises writers anyway, and the event loop must not block
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="journal")
        self.ops: list[tuple[str, list[tuple]]] = []
        self.waiters: list[asyncio.Future[None]] = []
        self.flushing: asyncio.Task | None = None

    # --- writes, queued here and committed together ---

    def add(self, rows: list[tuple[str, str, str, str, float | None, str | None]]) -> None:
        """(id, model, task, text, deadline, owner) of newly accepted jobs."""
        self._write(
            "INSERT OR IGNORE INTO jobs(id, model, task, text, deadline, owner, state) "
            "VALUES (?,?,?,?,?,?,'queued')",
            rows,
        )

    def finish(
        self, jid: str, state: str, entry: dict[str, Any], embedding: torch.Tensor | None
    ) -> None:
        blob = None if embedding is None else embedding.to(torch.float32).numpy().tobytes()
        self._write(
            "UPDATE jobs SET state=?, finished=?, entry=?, embedding=? WHERE id=?",
            [(state, time.time(), msgpack.packb(entry), blob, jid)],
        )

    def attempt(self, ids: list[str], attempts: list[int]) -> None:
        self._write("UPDATE jobs SET attempts=? WHERE id=?", list(zip(attempts, ids, strict=True)))

    def _write(self, sql: str, rows: list[tuple]) -> None:
        if self.ops and self.ops[-1][0] == sql:
            self.ops[-1][1].extend(rows)  # one executemany for a run of the same statement
        else:
            self.ops.append((sql, list(rows)))
        self._kick()  # committed in the background, grouped with whatever else is waiting

    async def commit(self) -> None:
        """Resolves once every write queued so far is committed (at once for `off`)."""
        if self.durability == "off":
            self._kick()
            return
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        self._kick()
        await fut

    def _kick(self) -> None:
        if self.flushing is None or self.flushing.done():
            self.flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self.ops or self.waiters:
            ops, waiters = self.ops, self.waiters
            self.ops, self.waiters = [], []
            try:
                await loop.run_in_executor(self.pool, self._apply, ops)
            except Exception as e:
                for w in waiters:
                    if not w.done():
                        w.set_exception(e)
                continue
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    def _apply(self, ops: list[tuple[str, list[tuple]]]) -> None:
        if not ops:
            return
        with self.db:  # one transaction: the group commit
            self.db.execute("BEGIN")
            for sql, rows in ops:
                self.db.executemany(sql, rows)

    async def close(self) -> None:
        if self.ops or self.waiters or (self.flushing and not self.flushing.done()):
            self._kick()
            await self.flushing
        self.pool.shutdown(wait=True)
        self.reader.close()
        self.db.close()

    # --- reads (start-up, and idempotency look-ups of results no longer in memory) ---

    def unfinished(self) -> Iterator[Row]:
        """Every job accepted but not finished, in acceptance order."""
        cur = self.reader.execute(
            "SELECT id, model, task, text, deadline, attempts, state, entry, embedding, owner "
            "FROM jobs WHERE state='queued' ORDER BY seq"
        )
        for r in cur:
            yield _row(r)

    def lookup(self, ids: list[str]) -> dict[str, Row]:
        """The journal's rows for these ids (those it has), one query per 500 ids."""
        out: dict[str, Row] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            cur = self.reader.execute(
                "SELECT id, model, task, text, deadline, attempts, state, entry, embedding, owner "
                f"FROM jobs WHERE id IN ({marks})",
                chunk,
            )
            out.update((r[0], _row(r)) for r in cur)
        return out

    def expire(self) -> None:
        """Forget finished jobs older than the TTL."""
        cutoff = time.time() - self.ttl
        self._write("DELETE FROM jobs WHERE state!='queued' AND finished < ?", [(cutoff,)])


def _row(r: tuple) -> Row:
    entry = msgpack.unpackb(r[7], raw=False) if r[7] is not None else None
    emb = torch.frombuffer(bytearray(r[8]), dtype=torch.float32) if r[8] else None
    return Row(r[0], r[1], r[2], r[3], r[4], r[5], r[6], entry, emb, r[9])


def _migrate(db: sqlite3.Connection) -> None:
    """Journals written before jobs had owners get the column (NULL: an open endpoint's)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    if "owner" not in columns:
        db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
