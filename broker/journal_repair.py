"""Checking a journal before SQLite opens it, and recovering what can be proven intact.

Why before SQLite: SQLite silently ignores a write-ahead log whose header fails its checksum,
and stops reading the log at the first frame that fails its checksum. Every transaction from
there on is dropped without an error, and the next write overwrites it. A journal whose WAL was
damaged would open "fine" and simply have forgotten jobs it had acknowledged. So `check` reads
the WAL itself (SQLite's documented format, https://sqlite.org/fileformat2.html#walformat)
first, and `baton up` refuses a damaged journal instead of letting SQLite drop part of it.

What `check` detects:
- a non-empty WAL whose header is bad: wrong magic, page size, or header checksum (SQLite would
  ignore the whole log);
- a frame of the current generation (its salts equal the header's) that fails its checksum or
  salt, while some later frame of the current generation is an intact commit: its checksum,
  seeded with its predecessor's stored checksum, matches (SQLite would drop that commit, and
  every commit between, without a word);
- a main database file failing `PRAGMA quick_check` (done by `Journal` after the WAL check).

What it does not detect (documented in docs/architecture.md):
- damage confined to the log's last committed transaction: it cannot be told apart from a write
  torn by a crash, which SQLite rightly discards;
- damage to a main-file page that still forms a valid b-tree page (SQLite pages carry no
  checksums), e.g. altered bytes inside a row's text;
- frames of earlier generations (other salts) are legitimate leftovers and are not examined.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack

WAL_MAGIC = 0x377F0682  # low bit set (0x377f0683): checksums read words big-endian
WAL_VERSION = 3007000
HEADER = 32
FRAME_HEADER = 24
STATES = frozenset({"queued", "done", "failed", "cancelled"})
COLUMNS = (
    "seq, id, model, task, text, deadline, attempts, state, finished, entry, embedding, owner, "
    "params"
)


class JournalDamaged(Exception):
    """The journal failed a check; nothing was changed on disk."""


def checksum(data: bytes, big_endian: bool, s0: int = 0, s1: int = 0) -> tuple[int, int]:
    """SQLite's cumulative WAL checksum over `data` (a multiple of 8 bytes), seeded (s0, s1)."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    m = 0xFFFFFFFF
    for a, b in zip(words[0::2], words[1::2], strict=True):
        s0 = (s0 + a + s1) & m
        s1 = (s1 + b + s0) & m
    return s0, s1


@dataclass(slots=True)
class Frame:
    index: int  # 1-based, as SQLite counts
    offset: int
    pgno: int
    commit: int  # database size in pages after this commit; 0 for a frame that is not a commit
    salts: bytes
    stored: tuple[int, int]  # the cumulative checksum stored in its header


@dataclass(slots=True)
class Wal:
    """A parsed WAL: header fields and every complete frame (valid or not)."""

    size: int
    header_ok: bool
    header_problem: str
    big_endian: bool
    page_size: int
    salts: bytes
    seed: tuple[int, int]  # the header's checksum: where the frames' chain starts
    frames: list[Frame]
    data: bytes

    def page(self, f: Frame) -> bytes:
        return self.data[f.offset + FRAME_HEADER : f.offset + FRAME_HEADER + self.page_size]

    def intact(self, f: Frame, seed: tuple[int, int]) -> bool:
        """Does frame f verify as SQLite checks it, its chain seeded with `seed`?"""
        if f.salts != self.salts or f.pgno == 0:
            return False
        head = self.data[f.offset : f.offset + 8]
        s = checksum(head, self.big_endian, *seed)
        return checksum(self.page(f), self.big_endian, *s) == f.stored

    def valid_prefix(self) -> tuple[list[Frame], int | None]:
        """The frames SQLite's own recovery keeps (up to the last intact commit before the first
        bad frame), and the index of that first bad frame (None if all are intact)."""
        seed, kept, upto = self.seed, [], 0
        for i, f in enumerate(self.frames):
            if not self.intact(f, seed):
                return self.frames[:upto], i
            seed = f.stored
            kept.append(f)
            if f.commit:
                upto = len(kept)
        return self.frames[:upto], None

    def later_commits(self, first_bad: int) -> list[Frame]:
        """Commits after the first bad frame that are intact against their predecessor."""
        out = []
        for i in range(max(first_bad, 1), len(self.frames)):
            f = self.frames[i]
            if f.commit and self.intact(f, self.frames[i - 1].stored):
                out.append(f)
        return out


def read_wal(path: str | Path) -> Wal | None:
    """Parse a WAL file; None when there is none (or it is empty)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    if not data:
        return None
    if len(data) < HEADER:
        return Wal(len(data), False, f"{len(data)} bytes, shorter than a header", False, 0,
                   b"", (0, 0), [], data)  # fmt: skip
    magic, version, page_size, _ckpt, _s1, _s2, c0, c1 = struct.unpack(">8I", data[:HEADER])
    big = bool(magic & 1)
    problem = ""
    if magic & 0xFFFFFFFE != WAL_MAGIC:
        problem = f"bad magic 0x{magic:08x}"
    elif version != WAL_VERSION:
        problem = f"unknown version {version}"
    elif page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
        problem = f"bad page size {page_size}"
    elif checksum(data[:24], big) != (c0, c1):
        problem = "header checksum mismatch"
    wal = Wal(len(data), not problem, problem, big, page_size, data[16:24], (c0, c1), [], data)
    if not problem:
        wal.frames = list(_frames(data, page_size))
    return wal


def _frames(data: bytes, page_size: int) -> Iterator[Frame]:
    step = FRAME_HEADER + page_size
    for k, off in enumerate(range(HEADER, len(data) - step + 1, step)):
        pgno, commit = struct.unpack(">II", data[off : off + 8])
        stored = struct.unpack(">II", data[off + 16 : off + 24])
        yield Frame(k + 1, off, pgno, commit, data[off + 8 : off + 16], stored)


def check_wal(path: str | Path) -> str | None:
    """Why the WAL at `path` is damaged in a way SQLite would silently hide; None if it is not."""
    wal = read_wal(path)
    if wal is None:
        return None
    if not wal.header_ok:
        return f"the WAL header is bad ({wal.header_problem}); SQLite would ignore all of the WAL"
    kept, first_bad = wal.valid_prefix()
    if first_bad is None:
        return None
    later = wal.later_commits(first_bad)
    if not later:
        return None  # a torn, uncommitted tail: legitimate, SQLite discards it
    return (
        f"WAL frame {first_bad + 1} fails its checksum but {len(later)} later committed "
        f"transaction(s) are intact; SQLite would silently drop them "
        f"({len(wal.frames) - len(kept)} of {len(wal.frames)} frames)"
    )


def quick_check(db: sqlite3.Connection) -> str | None:
    """SQLite's quick_check; None if it passes, else its first findings."""
    try:
        rows = [r[0] for r in db.execute("PRAGMA quick_check(5)")]
    except sqlite3.DatabaseError as e:
        return str(e)
    return None if rows == ["ok"] else "; ".join(map(str, rows))


# --- recovery ---


@dataclass(slots=True)
class Recovered:
    kept_queued: int
    kept_finished: int
    lost: int | None  # jobs known to be lost; None = cannot be told
    aside: Path
    notes: list[str]

    def report(self) -> str:
        kept = self.kept_queued + self.kept_finished
        lost = "unknown" if self.lost is None else str(self.lost)
        lines = [
            f"kept {kept} jobs ({self.kept_queued} unfinished, {self.kept_finished} finished); "
            f"lost {lost}",
            f"the damaged files were moved to {self.aside}",
            *self.notes,
        ]
        return "\n".join(lines)


def recover(path: str | Path) -> Recovered:
    """Move the journal's files aside (never deleted) and write at `path` a fresh journal holding
    every job that can be proven intact. The caller holds the journal's lock."""
    from broker.journal import SCHEMA  # the one schema; imported late to avoid a cycle

    path = Path(path)
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    aside.mkdir()
    moved = {}
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            dst = aside / src.name
            os.rename(src, dst)
            moved[suffix] = dst
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="baton-recover-") as tmp:
        scratch = Path(tmp) / "image.sqlite3"
        if "" in moved:
            shutil.copyfile(moved[""], scratch)
        else:
            scratch.touch()
        wal = read_wal(moved["-wal"]) if "-wal" in moved else None
        later: list[tuple[int, bytes]] = []  # (pgno, page) of intact frames past the damage
        if wal is not None:
            wal, note = _usable(wal)
            notes.append(note)
            if wal is not None:
                kept, first_bad = wal.valid_prefix()
                _apply(scratch, wal, kept)
                notes.append(f"WAL: {len(kept)} frames up to the last intact commit applied")
                if first_bad is not None:
                    for i in range(max(first_bad, 1), len(wal.frames)):
                        f = wal.frames[i]
                        if wal.intact(f, wal.frames[i - 1].stored):
                            later.append((f.pgno, wal.page(f)))
        _plain(scratch)
        rows, unreadable, malformed = _salvage(scratch)
        if malformed:
            notes.append(f"{malformed} rows were readable but malformed and were dropped")
        lost = unreadable + malformed
        newer = _newest_counter(scratch, wal.page_size if wal else 0, later) if later else None
        counter = _counter(scratch)
        if later:
            if newer is not None and counter is not None:
                lost += max(0, newer - counter)
            else:
                lost = None  # jobs were in frames past the damage, but how many cannot be read
                notes.append("jobs accepted after the damaged frame cannot be counted")
        fresh = Path(tmp) / "fresh.sqlite3"
        out = sqlite3.connect(fresh, isolation_level=None)
        try:
            out.execute("PRAGMA journal_mode=WAL")
            out.executescript(SCHEMA)
            out.execute("BEGIN")
            marks = ",".join("?" * len(COLUMNS.split(",")))
            out.executemany(f"INSERT INTO jobs({COLUMNS}) VALUES ({marks})", rows)
            out.execute("COMMIT")
        finally:
            out.close()  # checkpoints: the new journal is one self-contained file
        shutil.move(fresh, path)
    queued = sum(1 for r in rows if r[7] == "queued")
    return Recovered(queued, len(rows) - queued, lost, aside, notes)


def _usable(wal: Wal) -> tuple[Wal | None, str]:
    """A WAL whose frames can be verified; a bad header is worked around when the frames still
    verify against its stored salts and checksum under some byte order and page size."""
    if wal.header_ok:
        return wal, f"WAL: {len(wal.frames)} frames of {wal.page_size} bytes"
    if wal.size < HEADER:
        return None, "WAL: shorter than its header; nothing in it can be verified"
    declared = struct.unpack(">I", wal.data[8:12])[0]
    sizes = [declared] + [1 << k for k in range(9, 17) if 1 << k != declared]
    for size in sizes:
        if size < 512 or size > 65536 or size & (size - 1):
            continue
        for big in (False, True):
            trial = Wal(wal.size, True, "", big, size, wal.salts, wal.seed, [], wal.data)
            trial.frames = list(_frames(wal.data, size))
            if trial.frames and trial.intact(trial.frames[0], trial.seed):
                return trial, (
                    f"WAL: bad header ({wal.header_problem}), but its frames verify against its "
                    f"stored salts and checksum ({size}-byte pages)"
                )
    return None, f"WAL: bad header ({wal.header_problem}); no frame can be verified"


def _apply(db: Path, wal: Wal, frames: list[Frame]) -> None:
    """What a checkpoint does: each frame's page written in order, then the size of the last
    commit."""
    with db.open("r+b") as f:
        for fr in frames:
            f.seek((fr.pgno - 1) * wal.page_size)
            f.write(wal.page(fr))
        if frames:
            f.truncate(frames[-1].commit * wal.page_size)


def _plain(db: Path) -> None:
    # header bytes 18-19: 2 = WAL mode; 1 makes the image a plain file that reads on its own
    with db.open("r+b") as f:
        if f.seek(0, os.SEEK_END) >= 100:
            f.seek(18)
            f.write(b"\x01\x01")


def _open_ro(db: Path) -> sqlite3.Connection:
    # immutable: read the image as is, without a WAL or locks of its own
    return sqlite3.connect(f"file:{db}?immutable=1", uri=True)


def _salvage(db: Path) -> tuple[list[tuple], int, int]:
    """Rows that read back without error and are well formed; (rows, unreadable, malformed)."""
    try:
        con = _open_ro(db)
    except sqlite3.Error:
        return [], 0, 0
    try:
        columns = _columns(con)
        try:
            intact = con.execute("PRAGMA integrity_check(1)").fetchone()[0] == "ok"
        except sqlite3.DatabaseError:
            intact = False
        if intact:
            try:
                raw = con.execute(f"SELECT {columns} FROM jobs ORDER BY seq").fetchall()
            except sqlite3.DatabaseError:
                return [], 0, 0  # no jobs table: nothing was ever journaled here
            good = [r for r in raw if _well_formed(r)]
            return good, 0, len(raw) - len(good)
        # a damaged b-tree: look each row up on its own, so one bad page costs only its rows
        top = _counter_on(con) or _max_seq(con) or 0
        rows, unreadable, malformed = [], 0, 0
        for seq in range(1, top + 1):
            try:
                r = con.execute(f"SELECT {columns} FROM jobs WHERE seq=?", (seq,)).fetchone()
            except sqlite3.DatabaseError:
                unreadable += 1
                continue
            if r is None:
                continue  # expired, never existed, or on a page the damage hid (see below)
            if _well_formed(r):
                rows.append(r)
            else:
                malformed += 1
        # a damaged page may hide its rows without an error; the indexes (other pages) still
        # name every row that existed, by seq
        named = _indexed(con)
        kept = {r[0] for r in rows}
        hidden = len(named - kept) - unreadable - malformed if named else 0
        return rows, unreadable + max(0, hidden), malformed
    finally:
        con.close()


def _indexed(con: sqlite3.Connection) -> set[int]:
    """The seqs the jobs table's indexes hold (each is read without touching the table)."""
    out: set[int] = set()
    for index, column in (("sqlite_autoindex_jobs_1", "id"), ("jobs_state", "state")):
        try:
            cur = con.execute(f"SELECT seq FROM jobs INDEXED BY {index} ORDER BY {column}")
            out.update(r[0] for r in cur if isinstance(r[0], int))
        except sqlite3.DatabaseError:
            continue  # that index is damaged too
    return out


def _columns(con: sqlite3.Connection) -> str:
    """COLUMNS as this journal has them: one written before jobs had owners, or before generate
    jobs had params, reads NULL there."""
    try:
        have = {r[1] for r in con.execute("PRAGMA table_info(jobs)")}
    except sqlite3.DatabaseError:
        have = set()
    columns = COLUMNS
    for late in ("owner", "params"):
        if late not in have:
            columns = columns.replace(f", {late}", ", NULL")
    return columns


def _well_formed(r: tuple) -> bool:
    seq, jid, model, task, text, deadline, attempts, state, finished, entry, emb, owner, params = r
    if any(x is not None and not isinstance(x, str) for x in (owner, params)):
        return False
    if not (isinstance(seq, int) and all(isinstance(x, str) for x in (jid, model, task, text))):
        return False
    if deadline is not None and not isinstance(deadline, int | float):
        return False
    if not isinstance(attempts, int) or state not in STATES:
        return False
    if finished is not None and not isinstance(finished, int | float):
        return False
    if entry is not None:
        try:
            if not isinstance(msgpack.unpackb(entry, raw=False), dict):
                return False
        except Exception:
            return False
    return emb is None or (isinstance(emb, bytes) and len(emb) % 4 == 0)


def _counter_on(con: sqlite3.Connection) -> int | None:
    """The AUTOINCREMENT counter: the seq of the last job ever accepted."""
    try:
        row = con.execute("SELECT seq FROM sqlite_sequence WHERE name='jobs'").fetchone()
    except sqlite3.DatabaseError:
        return None
    return row[0] if row and isinstance(row[0], int) else None


def _max_seq(con: sqlite3.Connection) -> int | None:
    try:
        row = con.execute("SELECT max(seq) FROM jobs").fetchone()
    except sqlite3.DatabaseError:
        return None
    return row[0] if row and isinstance(row[0], int) else None


def _counter(db: Path) -> int | None:
    try:
        con = _open_ro(db)
    except sqlite3.Error:
        return None
    try:
        return _counter_on(con) or 0
    finally:
        con.close()


def _newest_counter(db: Path, page_size: int, later: list[tuple[int, bytes]]) -> int | None:
    """The job counter as the newest intact frame past the damage holds it: the counter's table
    is one small leaf page, self-contained, so its newest intact copy can be read on its own."""
    try:
        con = _open_ro(db)
        root = con.execute("SELECT rootpage FROM sqlite_schema WHERE name='sqlite_sequence'")
        row = root.fetchone()
        con.close()
    except sqlite3.Error:
        return None
    if not row:
        return None
    pages = [page for pgno, page in later if pgno == row[0]]
    if not pages:
        return None
    with tempfile.TemporaryDirectory(prefix="baton-counter-") as tmp:
        copy = Path(tmp) / "counter.sqlite3"
        shutil.copyfile(db, copy)
        with copy.open("r+b") as f:
            f.seek((row[0] - 1) * page_size)
            f.write(pages[-1])
        return _counter(copy)


# --- `baton journal check|recover PATH` ---


def check_command(path: str) -> int:
    """0: intact; 1: damaged (what `baton up` would refuse); 2: cannot be checked now."""
    from broker.journal import JournalError, lock

    if not Path(path).exists():
        print(f"baton journal check: no journal at {path}")
        return 2
    try:
        fd = lock(path)  # a journal in use is changing under us: not checked
    except JournalError as e:
        print(f"baton journal check: {e}")
        return 2
    try:
        why = check_wal(f"{path}-wal")
        if why is None:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                why = quick_check(con)
            finally:
                con.close()
    finally:
        os.close(fd)
    if why:
        print(f"damaged: {why}\nrun: baton journal recover {path}")
        return 1
    print("ok")
    return 0


def recover_command(path: str) -> int:
    from broker.journal import JournalError, lock

    if not any(Path(f"{path}{s}").exists() for s in ("", "-wal")):
        print(f"baton journal recover: no journal at {path}")
        return 2
    try:
        fd = lock(path)  # never while a `baton up` owns it
    except JournalError as e:
        print(f"baton journal recover: {e}")
        return 2
    try:
        done = recover(path)
    finally:
        os.close(fd)
    print(done.report())
    return 0
