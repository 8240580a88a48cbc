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
import time
from pathlib import Path

import uvloop
import zmq
import zmq.asyncio

from broker.broker import Admission, Broker
from broker.journal import Journal
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
    except sqlite3.Error as e:
        print(f"baton up: cannot open the journal {cfg.journal.path!r}: {e}", file=sys.stderr)
        return 2


async def serve(cfg: Config) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    run_dir = Path(tempfile.mkdtemp(prefix="baton-"))
    journal = Journal(
        cfg.journal.path or str(run_dir / "journal.sqlite3"),
        cfg.journal.durability,
        cfg.journal.result_ttl_s,
    )
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
                cfg.limits.max_queued_bytes,
                cfg.limits.max_ids_per_message,
                cfg.limits.max_unread_bytes,
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


async def unregistered(broker: Broker, ident: bytes, cfg: Config) -> None:
    """Returns once the controller `ident` has been unknown to the broker for three silence
    timeouts in a row after it first registered (a controller that lost its registration says
    `ready` again as soon as it hears so; one that does not is stuck)."""
    bound = 3 * cfg.workers.dead_after_ms / 1000
    period = cfg.workers.heartbeat_ms / 1000
    seen = False
    missing_since: float | None = None
    while True:
        await asyncio.sleep(period)  # the heartbeat period: the broker's view changes no faster
        now = time.monotonic()
        if ident in broker.controllers:
            seen, missing_since = True, None
        elif seen:
            missing_since = missing_since or now
            if now - missing_since > bound:
                return


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
        adrift = asyncio.create_task(unregistered(broker, identity(proc.pid), cfg))
        await asyncio.wait({exited, stopping, adrift}, return_when=asyncio.FIRST_COMPLETED)
        adrift.cancel()
        if stop.is_set():
            break
        if adrift.done() and not adrift.cancelled() and proc.returncode is None:
            # alive, but it has not managed to register again: a fresh one will
            log.error("controller %d stays unregistered; killing it", proc.pid)
            proc.kill()
            await proc.wait()
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
