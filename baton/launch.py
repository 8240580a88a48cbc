"""Fleet: `baton up` as a real subprocess, for the demo, tests and benchmarks.

The child runs in its own session (process group), so stopping can take its workers with it.
Its stdout and stderr are teed by a reader thread into a log file; readiness is the first stdout
line starting with `ready `, signalled through an Event rather than by polling the log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Fleet:
    def __init__(
        self,
        config: str | Path,
        sets: Sequence[str] = (),
        *,
        log: str | Path | None = None,
        ready_timeout_s: float = 180.0,
        gateway: bool = False,
    ) -> None:
        self.config = str(config)
        self.sets = list(sets)
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        # the HTTP gateway costs a process: only fleets that speak HTTP get one, on a free port
        self.http = f"http://127.0.0.1:{free_port()}" if gateway else ""
        if log is None:
            fd, name = tempfile.mkstemp(prefix="baton-up-", suffix=".log")
            os.close(fd)
            log = name
        self.log = Path(log)
        self.ready_timeout_s = ready_timeout_s
        self.ready_line: str | None = None
        self.proc: subprocess.Popen[str] | None = None
        self._settled = threading.Event()  # ready line seen, or the child is gone
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "baton.cli",
            "up",
            "--config",
            self.config,
            "--set",
            f"endpoints.client={self.endpoint}",
            "--set",
            f'gateway.listen="{self.http.removeprefix("http://")}"',
            *(arg for s in self.sets for arg in ("--set", s)),
        ]

    def start(self) -> Fleet:
        self.proc = subprocess.Popen(
            self.command(),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            start_new_session=True,
            # a pipe makes Python block-buffer stdout; the ready line must not sit in a buffer
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._threads = [
            threading.Thread(target=self._tee, name="fleet-log", daemon=True),
            threading.Thread(target=self._reap, name="fleet-wait", daemon=True),
        ]
        for t in self._threads:
            t.start()
        if not self._settled.wait(self.ready_timeout_s):
            code = self.stop()
            raise TimeoutError(
                f"baton up printed no 'ready' line within {self.ready_timeout_s:g} s "
                f"(stopped, exit {code}); log {self.log}:\n{self.tail()}"
            )
        if self.ready_line is None:
            code = self.stop()
            raise RuntimeError(
                f"baton up exited {code} before ready; log {self.log}:\n{self.tail()}"
            )
        return self

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, bounded wait, then SIGKILL to the whole group; returns the exit code."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
                proc.wait(10)
        # anything the leader left behind in its group goes too (also closes the log pipe)
        self._kill_group()
        for t in self._threads:
            t.join(5)
        return proc.returncode

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _kill_group(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
            os.killpg(self.proc.pid, signal.SIGKILL)

    def _tee(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with self.log.open("a", encoding="utf-8") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                if self.ready_line is None and line.startswith("ready "):
                    self.ready_line = line.strip()
                    self._settled.set()
        self._settled.set()

    def _reap(self) -> None:
        # workers may hold the pipe open after the leader dies; its exit settles start() too
        assert self.proc is not None
        self.proc.wait()
        self._settled.set()
