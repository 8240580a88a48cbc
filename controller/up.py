"""`baton up`: the broker in this process, one controller process per replica, in the foreground.

Prints `ready <client endpoint>` once a controller has registered with all its workers ready. On
SIGINT or SIGTERM it stops admitting, lets the broker finish what it holds (bounded), stops the
controller (which stops its workers) and exits 0. A controller that dies is started again; the
broker puts the jobs it held back in the queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import sqlite3
import sys
import tempfile
from pathlib import Path

import uvloop
import zmq
import zmq.asyncio

from broker.broker import Admission, Broker
from broker.journal import Journal, JournalError
from broker.journal_repair import JournalDamaged
from broker.protocol import Limits
from controller.config import Config, ConfigError, check_model, load
from controller.controller import identity
from workers.checkpoint import load_info

log = logging.getLogger("baton.up")

DRAIN_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
RESTART_BACKOFF_S = (0.5, 1, 2, 5, 10)


def up(config: str, sets: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # a file-size limit (RLIMIT_FSIZE) must reach the journal as a failed write it can hold and
    # retry, not kill the server (SIGXFSZ's default action)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        cfg = load(config, sets)
        check_model(cfg, load_info(cfg.model.path))
    except (ConfigError, ValueError, OSError) as e:
        print(f"baton up: {e}", file=sys.stderr)
        return 2
    try:
        return uvloop.run(serve(cfg))
    except zmq.ZMQError as e:
        print(f"baton up: cannot bind {cfg.endpoints.client}: {e}", file=sys.stderr)
        return 2
    except JournalError as e:
        print(f"baton up: {e}", file=sys.stderr)
        return 2
    except JournalDamaged as e:
        path = cfg.journal.path
        print(
            f"baton up: the journal {path} is damaged: {e}\n"
            f"Nothing was changed. To move the damaged files aside and keep every job that can "
            f"be proven intact, run:\n    baton journal recover {path}",
            file=sys.stderr,
        )
        return 2
    except sqlite3.Error as e:
        print(f"baton up: cannot open the journal {cfg.journal.path!r}: {e}", file=sys.stderr)
        return 2


async def serve(cfg: Config) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    run_dir = Path(tempfile.mkdtemp(prefix="baton-"))
    try:  # owned, checked and opened before anything starts: a refusal costs nothing
        journal = Journal(
            cfg.journal.path or str(run_dir / "journal.sqlite3"),
            cfg.journal.durability,
            cfg.journal.result_ttl_s,
        )
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    ctx = zmq.asyncio.Context()
    try:
        broker = Broker(
            ctx,
            cfg.endpoints.client,
            journal,
            Limits(cfg.limits.max_message_bytes, cfg.limits.max_frames),
            Admission(
                cfg.limits.max_jobs_per_message,
                cfg.limits.max_text_chars,
                cfg.limits.max_queued,
                cfg.jobs.max_attempts,
            ),
            heartbeat_s=cfg.workers.heartbeat_ms / 1000,
            dead_after_s=cfg.workers.dead_after_ms / 1000,
        )
    except BaseException:
        await journal.close()
        ctx.destroy(0)
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    serving = asyncio.create_task(broker.run())
    try:
        await supervise(cfg, broker, run_dir, stop)
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        broker.close()
        await journal.close()  # whatever is still held stays journaled for the next start
        ctx.term()
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


async def supervise(cfg: Config, broker: Broker, run_dir: Path, stop: asyncio.Event) -> None:
    """Keep one controller running until asked to stop; then drain and stop it."""
    announced = False
    failures = 0
    stopping = asyncio.create_task(stop.wait())
    while True:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "controller.controller",
            "--config-json",
            json.dumps(cfg.to_dict()),
            "--broker",
            broker.backend,
            "--run-dir",
            str(run_dir),
            stdin=asyncio.subprocess.DEVNULL,
        )
        exited = asyncio.create_task(proc.wait())
        if not announced:
            registered = asyncio.create_task(broker.registered.wait())
            await asyncio.wait({registered, exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            registered.cancel()
            if broker.registered.is_set():
                announced = True
                print(f"ready {broker.endpoint}", flush=True)
        await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            break
        # the controller died under us: its jobs go back to the queue, and it starts again
        broker.lost(identity(proc.pid), f"controller exited with code {proc.returncode}")
        delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
        failures += 1
        log.error("controller exited with code %s; restarting in %.1f s", proc.returncode, delay)
        try:
            await asyncio.wait_for(stop.wait(), delay)  # a restart backoff that a stop cuts short
            break
        except TimeoutError:
            continue
    drained = await broker.drain(DRAIN_TIMEOUT_S)
    if not drained:
        log.warning("drain timed out with jobs still held")
    if proc.returncode is None:
        if identity(proc.pid) not in broker.controllers:
            proc.terminate()  # never registered, so it cannot hear the broker's `stop`
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.error("controller did not stop in %.0f s; killing it", STOP_TIMEOUT_S)
            proc.kill()
            await proc.wait()
