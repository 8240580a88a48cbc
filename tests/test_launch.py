"""Fleet's process handling, with a stand-in for `baton up` (the real fleet is tested elsewhere)."""

from __future__ import annotations

import os
import select
import sys
import textwrap
import time

import pytest

from baton.launch import Fleet

# prints ready, leaves a SIGTERM-deaf "worker" in its group, exits on SIGTERM like `baton up`
FAKE_UP = textwrap.dedent(
    """
    import signal, subprocess, sys, threading
    worker = subprocess.Popen([sys.executable, "-c",
        "import signal, threading; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('worker up', flush=True); threading.Event().wait(120)"])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    print("worker pid", worker.pid, flush=True)
    print("ready " + sys.argv[1], flush=True)
    stop.wait(120)
    print("stopping", flush=True)
    sys.exit(0 if sys.argv[2] == "clean" else 3)
    """
)


class FakeFleet(Fleet):
    def __init__(self, mode: str, **kw) -> None:
        super().__init__("unused.toml", **kw)
        self.mode = mode

    def command(self) -> list[str]:
        if self.mode == "crash":
            return [sys.executable, "-c", "print('boom'); raise SystemExit(7)"]
        if self.mode == "silent":
            return [sys.executable, "-c", "import time; time.sleep(60)"]
        return [sys.executable, "-c", FAKE_UP, self.endpoint, self.mode]


def test_ready_then_stop_takes_the_group(tmp_path):
    with FakeFleet("clean", log=tmp_path / "up.log") as fleet:
        assert fleet.endpoint.startswith("tcp://127.0.0.1:")
        assert fleet.ready_line == f"ready {fleet.endpoint}"
        lines = fleet.log.read_text().splitlines()  # lines before `ready` are already there
        worker = int(next(ln for ln in lines if ln.startswith("worker pid")).split()[-1])
        exited = os.pidfd_open(worker)  # readable once the worker is gone
        code = fleet.stop()
    try:
        assert select.select([exited], [], [], 10)[0] == [exited], "worker outlived the fleet"
    finally:
        os.close(exited)
    assert code == 0 and "stopping" in fleet.log.read_text()


def test_exit_code_comes_back(tmp_path):
    fleet = FakeFleet("dirty", log=tmp_path / "up.log").start()
    assert fleet.stop() == 3


def test_exit_before_ready_raises_with_the_log(tmp_path):
    with pytest.raises(RuntimeError, match="exited 7 before ready(.|\n)*boom"):
        FakeFleet("crash", log=tmp_path / "up.log").start()


def test_no_ready_line_times_out_and_kills(tmp_path):
    fleet = FakeFleet("silent", log=tmp_path / "up.log", ready_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="no 'ready' line"):
        fleet.start()
    assert time.monotonic() - t0 < 10
    assert fleet.proc is not None and fleet.proc.poll() is not None


def test_real_up_failing_before_ready_raises(tmp_path):
    # a config that does not exist: `baton up` must fail, and Fleet must say so with the log
    fleet = Fleet(tmp_path / "missing.toml", log=tmp_path / "up.log", ready_timeout_s=60)
    with pytest.raises(RuntimeError, match="before ready"):
        fleet.start()
