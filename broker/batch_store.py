"""The Batch API's durable state: a small SQLite database (`batches.sqlite3`, WAL, synchronous
FULL) and a `files/` directory, in one directory beside the journal (`<journal.path>.batches/`;
the run's temporary directory when `journal.path` is empty). Only the gateway process writes it.

A batch's row holds its OpenAI object and its progress: the input lines done (`next_line`, the
byte offset past them) and the sizes its output and error files had when those lines were
written and fsynced. After a crash the runner cuts the files back to those sizes and goes on
from `next_line`: what was written after the last commit is written again, from results the
broker still holds. `seen` holds each batch's custom_ids (with their line) so a repeated one is
caught across restarts without holding them in memory.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, obj TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS seen (
    batch TEXT NOT NULL, custom_id TEXT NOT NULL, line INTEGER NOT NULL,
    PRIMARY KEY (batch, custom_id)) WITHOUT ROWID;
"""
# a batch in one of these is not over: its runner is started (again) when the gateway starts
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling", "expiring")
DAY_S = 24 * 3600  # the completion window "24h", OpenAI's only one


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


@dataclass(slots=True)
class Batch:
    """A batch: OpenAI's fields (what `api()` shows) and the runner's progress."""

    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    created_at: int
    metadata: dict[str, str] | None = None
    status: str = "validating"
    times: dict[str, int] = field(default_factory=dict)  # status -> when it was entered
    errors: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    completed: int = 0
    failed: int = 0
    # progress: lines [0, next_line) are written; input_offset is the byte just past them
    next_line: int = 0
    input_offset: int = 0
    output_bytes: int = 0
    error_bytes: int = 0
    output_file: str = ""  # their ids, made at creation, shown once the batch has finalized
    error_file: str = ""
    expires_at: int = 0  # set by the runner (created_at + its window); 0 in rows made before

    def enter(self, status: str) -> None:
        self.status = status
        self.times[status] = int(time.time())

    def api(self) -> dict[str, Any]:
        over = self.status in ("completed", "cancelled", "failed", "expired")
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file if over and self.status != "failed" else None,
            "error_file_id": self.error_file if over and self.error_bytes else None,
            "created_at": self.created_at,
            "expires_at": self.expires_at or self.created_at + DAY_S,
            **{f"{s}_at": self.times.get(s) for s in STAMPS},
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
        }


# OpenAI's `<status>_at` fields (it has none for expiring: its time is in the row's `times`)
STAMPS = ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")


class Store:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.files = directory / "files"
        self.files.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db = sqlite3.connect(directory / "batches.sqlite3")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a batch's answer promises it is on disk
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def path(self, file_id: str) -> Path:
        return self.files / file_id

    # --- files ---

    def add_file(self, obj: dict[str, Any]) -> None:
        self.db.execute("INSERT INTO files (id, obj) VALUES (?, ?)", (obj["id"], json.dumps(obj)))
        self.db.commit()

    def file(self, file_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT obj FROM files WHERE id = ?", (file_id,)).fetchone()
        return json.loads(row[0]) if row else None

    # --- batches ---

    def save(self, batch: Batch) -> None:
        """Write the batch (and the custom_ids seen so far) and commit: durable on return."""
        self.db.execute(
            "INSERT INTO batches (id, state) VALUES (?, ?) "
            "ON CONFLICT (id) DO UPDATE SET state = excluded.state",
            (batch.id, json.dumps(asdict(batch))),
        )
        self.db.commit()

    def batch(self, batch_id: str) -> Batch | None:
        row = self.db.execute("SELECT state FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return Batch(**json.loads(row[0])) if row else None

    def batches(self, after: str | None, limit: int) -> tuple[list[Batch], bool]:
        """Newest first, those older than `after`; and whether more follow."""
        seq = None
        if after is not None:
            row = self.db.execute("SELECT seq FROM batches WHERE id = ?", (after,)).fetchone()
            seq = row[0] if row else None
        rows = self.db.execute(
            "SELECT state FROM batches WHERE seq < ? ORDER BY seq DESC LIMIT ?",
            (seq if seq is not None else 2**62, limit + 1),
        ).fetchall()
        return [Batch(**json.loads(r[0])) for r in rows[:limit]], len(rows) > limit

    def unfinished(self) -> list[Batch]:
        rows = self.db.execute("SELECT state FROM batches ORDER BY seq").fetchall()
        return [b for b in (Batch(**json.loads(r[0])) for r in rows) if b.status in UNFINISHED]

    # --- custom_ids ---

    def first_seen(self, batch_id: str, custom_id: str, line: int) -> bool:
        """Record a line's custom_id; False when an earlier line of the batch had it. Committed
        with the batch's next save."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO seen (batch, custom_id, line) VALUES (?, ?, ?)",
            (batch_id, custom_id, line),
        )
        return cur.rowcount == 1

    def forget_from(self, batch_id: str, line: int) -> None:
        """Forget the custom_ids of lines from `line` on: they are read again on resuming."""
        self.db.execute("DELETE FROM seen WHERE batch = ? AND line >= ?", (batch_id, line))
        self.db.commit()

    def forget_batch(self, batch_id: str) -> None:
        """A finished batch needs its custom_ids no more."""
        self.db.execute("DELETE FROM seen WHERE batch = ?", (batch_id,))
        self.db.commit()


def fsync_dir(path: Path) -> None:
    """Make a file's creation or rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
