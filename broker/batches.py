"""The Batch API's runner, in the gateway process: each unfinished batch goes validating ->
in_progress -> finalizing -> completed (or failed, or cancelling -> cancelled), its input
streamed through a bounded window of lines (broker/batch_lines.py), its output and error files
written in input order.

Resuming without rerunning: the jobs of line n of batch B have the ids `B:n:k`, and progress
is committed (files fsynced first) every COMMIT_LINES lines or COMMIT_S seconds. A runner that
starts again (the gateway or all of `baton up` was killed) cuts the files back to the committed
sizes and submits the lines after the committed one again under the same ids: the broker
answers a finished job from the result it holds (`journal.result_ttl_s`) without running it,
and attaches to one still queued or running.

Expiry: a batch not over `window_s` after its created_at (the completion window "24h" is
86,400 s unless gateway.batch_expiry_s says otherwise) goes expiring -> expired: the jobs of
its lines in flight are cancelled at the broker, the lines that finished stay in the output
file and every other line gets a `batch_expired` line in the error file. created_at is in the
batch's row, so the deadline holds across restarts: a batch resumed past it expires at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from baton.client import Client
from broker.batch_lines import (
    CANCEL_CHUNK,
    Line,
    Outcome,
    Request,
    Window,
    cancel,
    custom_id_of,
    line_error,
    lines,
    read,
)
from broker.batch_store import DAY_S, Batch, Store, fsync_dir
from broker.texts import Texts

log = logging.getLogger("baton.batches")

COMMIT_LINES = 64  # progress is committed at least this often (and every COMMIT_S seconds)
COMMIT_S = 1.0
EXPIRED = "This request could not be executed before the completion window expired."  # OpenAI's


class Batches:
    def __init__(
        self, store: Store, client: Client, texts: Texts, window: int, window_s: float = DAY_S
    ) -> None:
        self.store = store
        self.client = client
        self.texts = texts
        self.window = window
        self.window_s = window_s  # the completion window's length: tests make it short
        self.live: dict[str, Batch] = {}  # the runners' batches: routes read and cancel these
        self.windows: dict[str, Window] = {}
        self.tasks: dict[str, asyncio.Task] = {}

    def start(self) -> None:
        """Resume every batch a previous run left unfinished."""
        for batch in self.store.unfinished():
            log.info("resuming batch %s (%s, line %d)", batch.id, batch.status, batch.next_line)
            self.launch(batch)

    async def close(self) -> None:
        """Stop the runners; their batches stay where the last commit left them."""
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.store.close()

    def get(self, batch_id: str) -> Batch | None:
        return self.live.get(batch_id) or self.store.batch(batch_id)

    def launch(self, batch: Batch) -> None:
        batch.expires_at = int(batch.created_at + self.window_s)
        self.live[batch.id] = batch
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self.tasks[batch.id] = task
        task.add_done_callback(lambda _: self._ended(batch.id))

    async def cancel(self, batch: Batch) -> None:
        """Committed as cancelling before it returns; the runner stops reading, and the jobs in
        its window are cancelled (lines that finish anyway are kept)."""
        batch.enter("cancelling")
        self.store.save(batch)
        window = self.windows.get(batch.id)
        if window is not None:
            await window.stop()

    def _ended(self, batch_id: str) -> None:
        self.tasks.pop(batch_id, None)
        self.live.pop(batch_id, None)
        self.windows.pop(batch_id, None)

    async def _run(self, batch: Batch) -> None:
        timer = asyncio.get_running_loop().create_task(self._expire_at(batch))
        try:
            if batch.status == "validating":
                await self._validate(batch)
            if batch.status == "in_progress" and time.time() >= self._deadline(batch):
                self._expiring(batch)  # resumed past its deadline: nothing more is sent
            # expiring: the lines not written yet are written as expired
            while batch.status == "in_progress" or (
                batch.status == "expiring" and batch.next_line < batch.total
            ):
                try:
                    await self._lines(batch)
                except TimeoutError as e:  # the broker went silent: go on from the last commit
                    log.warning("batch %s: %s; resuming from line %d", batch.id, e, batch.next_line)
            if batch.status in ("finalizing", "cancelling", "expiring"):
                self._finalize(batch)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug or a broken disk: the batch says so rather than hanging
            log.exception("batch %s failed", batch.id)
            batch.errors = [{"code": "internal", "message": str(e), "param": None, "line": None}]
            batch.enter("failed")
            self.store.save(batch)
        finally:
            timer.cancel()

    def _deadline(self, batch: Batch) -> float:
        return batch.created_at + self.window_s

    async def _expire_at(self, batch: Batch) -> None:
        """At the batch's deadline, if it is still running, stop it: a timer, not a poll."""
        await asyncio.sleep(max(0.0, self._deadline(batch) - time.time()))
        if batch.status in ("validating", "in_progress"):
            self._expiring(batch)
            window = self.windows.get(batch.id)
            if window is not None:
                await window.stop()

    def _expiring(self, batch: Batch) -> None:
        log.info("batch %s expired at line %d of %d", batch.id, batch.next_line, batch.total)
        batch.enter("expiring")
        self.store.save(batch)

    async def _validate(self, batch: Batch) -> None:
        path = self.store.path(batch.input_file_id)
        try:
            # in a thread: a file of 200 MB would hold every HTTP request up while it is counted
            total = await asyncio.to_thread(_count, path)
        except OSError as e:
            return self._fail(batch, "file_unreadable", f"the input file cannot be read: {e}")
        if total == 0:
            return self._fail(batch, "empty_file", "the input file holds no request lines")
        batch.total = total
        if batch.status == "validating":  # not cancelled meanwhile
            batch.enter("in_progress")
        self.store.save(batch)
        return None

    def _fail(self, batch: Batch, code: str, message: str) -> None:
        batch.errors = [{"code": code, "message": message, "param": None, "line": None}]
        batch.enter("failed")
        self.store.save(batch)

    async def _lines(self, batch: Batch) -> None:
        """Run the lines after the last committed one, committing as they are written."""
        batch_id = batch.id
        self.store.forget_from(batch_id, batch.next_line)
        window = Window(self.client, self.window, self.texts)
        self.windows[batch_id] = window
        with (
            self.store.path(batch.input_file_id).open("rb") as src,
            _open_at(self.store.path(batch.output_file), batch.output_bytes) as out,
            _open_at(self.store.path(batch.error_file), batch.error_bytes) as err,
        ):
            fsync_dir(self.store.files)  # the output files' names are durable before any line
            progress = Progress(batch)
            reqs = self._requests(batch, lines(src, batch.next_line, batch.input_offset))
            async for line, outcome in window.run(reqs):
                if outcome.cancelled and batch.status == "expiring":
                    outcome = line_error(outcome.custom_id, "batch_expired", EXPIRED)
                # a cancelled batch leaves the line out; a line whose job someone else cancelled
                # while the batch runs is answered so, in the error file
                if not outcome.cancelled or batch.status == "in_progress":
                    (out if outcome.ok else err).write(outcome.line())
                    progress.add(line, outcome)
                if progress.due():
                    self._commit(progress, out, err)
            if batch.status == "expiring":
                await self._expired(batch, progress, src, out, err)
            self._commit(progress, out, err)
        if batch.status == "in_progress":
            batch.enter("finalizing")
            self.store.save(batch)

    async def _expired(
        self, batch: Batch, progress: Progress, src: IO[bytes], out: IO[bytes], err: IO[bytes]
    ) -> None:
        """Every line not written yet, as a `batch_expired` error line. The jobs of the first
        of them may still be at the broker, sent by a run that was killed or stopped before
        its commit (at most a window and a commit's lines): they are cancelled."""
        stale: list[str] = []
        resent = self.window + COMMIT_LINES
        for line in lines(src, progress.next_line, progress.offset):
            obj, custom_id, _ = custom_id_of(line.raw)
            if obj is not None and custom_id is not None and line.number < batch.next_line + resent:
                req = read(obj, custom_id, batch.endpoint, f"{batch.id}:{line.number}", self.texts)
                stale += [j["id"] for j in req.jobs] if isinstance(req, Request) else []
            outcome = line_error(custom_id, "batch_expired", EXPIRED)
            err.write(outcome.line())
            progress.add(line, outcome)
            if progress.due():
                self._commit(progress, out, err)
        for k in range(0, len(stale), CANCEL_CHUNK):
            await cancel(self.client, stale[k : k + CANCEL_CHUNK])

    def _requests(self, batch: Batch, source: Iterator[Line]) -> Iterator[tuple[Line, object]]:
        for line in source:
            if batch.status != "in_progress":  # cancelled: read no further
                return
            yield line, self._read(batch, line)

    def _read(self, batch: Batch, line: Line) -> Request | Outcome:
        obj, custom_id, bad = custom_id_of(line.raw)
        if bad is not None:
            return bad
        assert obj is not None and custom_id is not None
        if not self.store.first_seen(batch.id, custom_id, line.number):
            why = f"line {line.number + 1}: custom_id {custom_id!r} repeats an earlier line's"
            return line_error(custom_id, "duplicate_custom_id", why)
        return read(obj, custom_id, batch.endpoint, f"{batch.id}:{line.number}", self.texts)

    def _commit(self, progress: Progress, out: IO[bytes], err: IO[bytes]) -> None:
        """Files first, then the row that says how much of them counts."""
        for f in (out, err):
            f.flush()
            os.fsync(f.fileno())
        progress.apply(out.tell(), err.tell())
        self.store.save(progress.batch)

    def _finalize(self, batch: Batch) -> None:
        over = {"cancelling": "cancelled", "expiring": "expired"}.get(batch.status, "completed")
        now = int(time.time())
        for file_id, size, kind in (
            (batch.output_file, batch.output_bytes, "output"),
            (batch.error_file, batch.error_bytes, "error"),
        ):
            # cut back to what was committed: a crash may have left more
            with _open_at(self.store.path(file_id), size) as f:
                os.fsync(f.fileno())
            if self.store.file(file_id) is None and (kind == "output" or size):
                self.store.add_file(
                    {
                        "id": file_id,
                        "object": "file",
                        "bytes": size,
                        "created_at": now,
                        "filename": f"{batch.id}_{kind}.jsonl",
                        "purpose": "batch_output",
                        "status": "processed",
                    }
                )
        batch.enter(over)
        self.store.save(batch)
        self.store.forget_batch(batch.id)


class Progress:
    """Lines written since the last commit: applied to the batch only at a commit, so the
    batch row (and what GET shows) always says what is on disk."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.next_line, self.offset = batch.next_line, batch.input_offset
        self.completed = self.failed = self.lines = 0
        self.since = time.monotonic()

    def add(self, line: Line, outcome: Outcome) -> None:
        self.next_line, self.offset = line.number + 1, line.end
        self.completed += outcome.ok
        self.failed += not outcome.ok
        self.lines += 1

    def due(self) -> bool:
        return self.lines >= COMMIT_LINES or time.monotonic() - self.since >= COMMIT_S

    def apply(self, output_bytes: int, error_bytes: int) -> None:
        b = self.batch
        b.next_line, b.input_offset = self.next_line, self.offset
        b.completed += self.completed
        b.failed += self.failed
        b.output_bytes, b.error_bytes = output_bytes, error_bytes
        self.completed = self.failed = self.lines = 0
        self.since = time.monotonic()


@contextlib.contextmanager
def _open_at(path: Path, size: int) -> Iterator[IO[bytes]]:
    """A file opened for appending at `size`, cut there first (created when missing)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+b") as f:
        f.truncate(size)
        f.seek(size)
        yield f


def _count(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in lines(f))
