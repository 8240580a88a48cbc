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

The journal is the truth, or nothing is acknowledged:
- One owner: an exclusive flock on `PATH.lock` (holding the owner's pid) is taken before the
  database is opened; the OS drops it when the owner dies, however it dies.
- No silent loss at open: the WAL is checked before SQLite sees it (`journal_repair.check_wal`)
  and `PRAGMA quick_check` runs after; a damaged journal raises JournalDamaged, untouched.
- A write that fails (disk full, read-only, I/O error) is kept, in order, and retried with a
  bounded backoff; until one succeeds the journal is unhealthy (`health()`), `commit()` waits,
  and so does everything that must not happen before its writes are durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from broker.journal_repair import JournalDamaged, check_wal, quick_check
from wire.protocol import DTYPES

log = logging.getLogger("baton.journal")

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
    embedding BLOB,             -- raw row (float32, or the job's "dtype"), for ok jobs with one
    owner TEXT,                 -- the submitter's CURVE key (z85); NULL on an open endpoint
    params TEXT                 -- JSON {"params", "token_ids"} of a generate job (an embed
                                -- job's {"dtype"} params if asked), and "priority" where
                                -- not 0; NULL for none
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
"""

MODES = {"sync": "FULL", "batch": "NORMAL", "off": "OFF"}
RETRY_FIRST_S = 0.05  # a failed commit is retried after this, doubling...
RETRY_MAX_S = 1.0  # ...up to this: the disk is re-tried about once a heartbeat while it fails
CLOSE_TIMEOUT_S = 5.0  # at close, how long a failing journal gets to take its last writes
CORRUPT_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB


class JournalError(Exception):
    """The journal cannot be opened; the message says why."""


class JournalBusy(JournalError):
    """Another process owns the journal."""


def lock(path: str) -> int:
    """Take the journal's lock (`PATH.lock`, holding our pid); returns its fd, kept open while we
    own the journal. The OS releases it when we die, however we die."""
    name = f"{path}.lock"
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # e.g. a read-only or missing directory
        raise JournalError(f"cannot take the journal's lock {name}: {e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise JournalBusy(f"the journal {path} is in use by pid {holder} (lock {name})") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


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
    token_ids: list[int] | None = None  # a generate job's prompt, when given as tokens
    params: dict[str, Any] | None = None  # a generate job's sampling fields, an embed job's dtype
    priority: int = 0


class Journal:
    def __init__(self, path: str, durability: str = "batch", result_ttl_s: float = 3600.0) -> None:
        if durability not in MODES:
            raise ValueError(
                f"journal.durability must be one of {', '.join(MODES)}, got {durability!r}"
            )
        self.path, self.durability, self.ttl = path, durability, result_ttl_s
        self.lock = lock(path)  # before anything reads the files: they may be changing
        self.db: sqlite3.Connection | None = None
        try:
            # before SQLite opens the database: its recovery would silently drop a damaged WAL
            why = check_wal(f"{path}-wal")
            if why:
                raise JournalDamaged(why)
            self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            why = quick_check(self.db)
            if why:
                raise JournalDamaged(f"PRAGMA quick_check failed: {why}")
            self.db.execute(f"PRAGMA synchronous={MODES[durability]}")
            self.db.executescript(SCHEMA)
            _migrate(self.db)
            # reads come from the event loop while the writer thread commits: a connection each
            self.reader = sqlite3.connect(path, check_same_thread=False)
        except sqlite3.DatabaseError as e:
            self._release()
            if e.sqlite_errorcode & 0xFF in CORRUPT_CODES:
                raise JournalDamaged(str(e)) from e
            raise
        except BaseException:
            self._release()
            raise
        # health: None while writes succeed; else the last error and when failing began
        self.error: str | None = None
        self.since: float | None = None
        self.failures = 0
        # one writer thread: SQLite serialises writers anyway, and the event loop must not block
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="journal")
        self.ops: list[tuple[str, list[tuple]]] = []
        self.commits = 0  # group commits made, and the seconds they took (for /metrics)
        self.commit_s = 0.0
        self.waiters: list[asyncio.Future[None]] = []
        self.flushing: asyncio.Task | None = None

    # --- writes, queued here and committed together ---

    def add(
        self,
        rows: list[
            tuple[str, str, str, str, float | None, str | None, list[int] | None, dict | None, int]
        ],
    ) -> None:
        """(id, model, task, text, deadline, owner, token_ids, params, priority) of newly
        accepted jobs; token_ids where the input came as tokens, params where the job has
        options (a generate job's sampling fields, an embed job's dtype when not float32)."""
        self._write(
            "INSERT OR IGNORE INTO jobs(id, model, task, text, deadline, owner, params, state) "
            "VALUES (?,?,?,?,?,?,?,'queued')",
            [(*r[:6], _params_json(r[6], r[7], r[8])) for r in rows],
        )

    def finish(
        self, jid: str, state: str, entry: dict[str, Any], embedding: torch.Tensor | None
    ) -> None:
        # raw bytes in the job's own dtype (float32, or float16 when it asked), read back by it
        blob = (
            None
            if embedding is None
            else embedding.contiguous().view(torch.uint8).numpy().tobytes()
        )
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
        delay = RETRY_FIRST_S
        while self.ops or self.waiters:
            ops, waiters = self.ops, self.waiters
            self.ops, self.waiters = [], []
            began = time.monotonic()
            try:
                await loop.run_in_executor(self.pool, self._apply, ops)
            except sqlite3.Error as e:
                # kept, ahead of newer writes (every statement here is idempotent, so a commit
                # that did land but reported failure may be applied again); the waiters keep
                # waiting: nothing they guard may happen before these writes are durable
                self.ops = ops + self.ops
                self.waiters = waiters + self.waiters
                self._failing(e)
                await asyncio.sleep(delay)  # a backoff, so a dead disk is not hammered
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            delay = RETRY_FIRST_S
            if ops:
                self.commits += 1
                self.commit_s += time.monotonic() - began
            if self.error is not None:
                self._recovered()
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    def _apply(self, ops: list[tuple[str, list[tuple]]]) -> None:
        if not ops:
            return
        db = self.db
        assert db is not None
        try:  # one transaction: the group commit
            db.execute("BEGIN")
            for sql, rows in ops:
                db.executemany(sql, rows)
            db.execute("COMMIT")
        except BaseException:
            # a failed COMMIT (e.g. SQLITE_FULL) may leave the transaction open; the retry must
            # start from a clean slate
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise

    def _failing(self, e: sqlite3.Error) -> None:
        self.failures += 1
        first = self.error is None
        self.error = f"{type(e).__name__}: {e}"
        if first:  # once per episode: a full disk must not also flood the log
            self.since = time.time()
            log.error(
                "journal %s cannot be written (%s); admitting no new jobs and holding results "
                "until it can; retrying every %.1f s at most",
                self.path,
                self.error,
                RETRY_MAX_S,
            )

    def _recovered(self) -> None:
        log.warning(
            "journal %s is writable again after %.1f s and %d failed commits; serving",
            self.path,
            time.time() - (self.since or time.time()),
            self.failures,
        )
        self.error, self.since, self.failures = None, None, 0

    @property
    def ok(self) -> bool:
        return self.error is None

    def health(self) -> dict[str, Any]:
        """For `status`: whether writes succeed, the last error and since when they fail."""
        return {
            "ok": self.ok,
            "error": self.error,
            "since": self.since,
            "pending": sum(len(rows) for _, rows in self.ops),
            "commits": self.commits,
            "commit_seconds": self.commit_s,
        }

    async def close(self) -> None:
        if self.ops or self.waiters or (self.flushing and not self.flushing.done()):
            self._kick()
            assert self.flushing is not None
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await asyncio.shield(self.flushing)
            except TimeoutError:
                # safe to give up: what is not committed was never acknowledged nor delivered
                # (accepted jobs are not in it; finished ones run again on the next start)
                pending = sum(len(rows) for _, rows in self.ops)
                log.error(
                    "journal %s: closing with %d writes not committed (%s); their jobs were "
                    "neither acknowledged nor delivered",
                    self.path,
                    pending,
                    self.error,
                )
                self.flushing.cancel()
                await asyncio.gather(self.flushing, return_exceptions=True)
                for w in self.waiters:
                    if not w.done():
                        w.set_exception(RuntimeError(f"journal closed: {self.error}"))
                self.ops, self.waiters = [], []
        self.pool.shutdown(wait=True)
        self.reader.close()
        self._release()

    def _release(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
        if self.lock >= 0:
            os.close(self.lock)  # the flock goes with the last fd
            self.lock = -1

    # --- reads (start-up, and idempotency look-ups of results no longer in memory) ---

    def unfinished(self) -> Iterator[Row]:
        """Every job accepted but not finished, in acceptance order."""
        cur = self.reader.execute(
            "SELECT id, model, task, text, deadline, attempts, state, entry, embedding, owner, params "
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
                "SELECT id, model, task, text, deadline, attempts, state, entry, embedding, owner, params "
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
    gen = json.loads(r[10]) if r[10] is not None else {}
    dtype = DTYPES.get((gen.get("params") or {}).get("dtype", "float32"), torch.float32)
    emb = torch.frombuffer(bytearray(r[8]), dtype=dtype) if r[8] else None
    return Row(
        r[0], r[1], r[2], r[3], r[4], r[5], r[6], entry, emb, r[9],
        gen.get("token_ids"), gen.get("params"), gen.get("priority", 0),
    )  # fmt: skip


def _params_json(token_ids: list[int] | None, params: dict | None, priority: int) -> str | None:
    if token_ids is None and params is None and not priority:
        return None
    extra: dict[str, Any] = {"token_ids": token_ids, "params": params}
    if priority:
        extra["priority"] = priority
    return json.dumps(extra, separators=(",", ":"))


def _migrate(db: sqlite3.Connection) -> None:
    """Journals written before jobs had owners, or before generate jobs, get the columns
    (NULL: an open endpoint's; not a generate job)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    if "owner" not in columns:
        db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
    if "params" not in columns:
        db.execute("ALTER TABLE jobs ADD COLUMN params TEXT")
