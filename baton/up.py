"""`baton up`: the broker in this process, one controller process per replica, in the foreground.

Prints `ready <client endpoint>` once every replica's controller has registered with all its
workers ready. On SIGINT or SIGTERM it stops admitting, lets the broker finish what it holds
(bounded), stops the controllers (which stop their workers) and exits 0. A controller that dies is
started again; the broker puts the jobs it held back in the queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sqlite3
import stat
import sys
import tempfile
import time
from pathlib import Path

import torch
import uvloop
import zmq
import zmq.asyncio
import zmq.auth

from broker.broker import Broker, Keys
from broker.gateway_process import Door, Gateway, admit, bind
from broker.journal import Journal, JournalError
from broker.journal_repair import JournalDamaged
from controller.config import Config, ConfigError, check_model, check_placement, load
from controller.controller import UNSTARTABLE, identity
from wire.transport import Heartbeat
from workers.layers.screen import screens
from workers.models import load_info
from workers.pool import PoolError, Region, layout, path_for

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
    except (ConfigError, ValueError, OSError) as e:
        print(f"baton up: {e}", file=sys.stderr)
        return 2
    try:
        info = load_info(cfg.model.path)
        check_model(cfg, info)
        check_placement(cfg, torch.cuda.device_count() if cfg.device != "cpu" else 0)
        check_keys(cfg)
    except (ConfigError, ValueError, OSError) as e:
        print(f"baton up: {e}{missing_model(cfg.model.path, config)}", file=sys.stderr)
        return 2
    try:
        door = bind(cfg, info)  # the HTTP gateway's socket, or None
    except (ConfigError, OSError) as e:
        print(f"baton up: {e}", file=sys.stderr)
        return 2
    try:
        return uvloop.run(serve(cfg, door))
    except zmq.ZMQError as e:
        print(f"baton up: cannot bind {cfg.endpoints.client}: {e}", file=sys.stderr)
        return 2
    except (JournalError, PoolError) as e:
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
    finally:
        if door is not None:
            door.sock.close()


async def serve(cfg: Config, door: Door | None = None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # every internal socket (broker <-> controller, controller <-> workers, stage to stage) is
    # an ipc:// file in here, and mkdtemp makes it 0700: no other user can connect to any of them
    run_dir = Path(tempfile.mkdtemp(prefix="baton-"))
    check_private(run_dir)
    try:  # owned, checked and opened before anything starts: a refusal costs nothing
        make_pool(cfg, run_dir)
        gateway_key = admit(door, cfg, run_dir)
        journal = Journal(
            cfg.journal.path or str(run_dir / "journal.sqlite3"),
            cfg.journal.durability,
            cfg.journal.result_ttl_s,
        )
    except BaseException:
        remove_run(run_dir)
        raise
    ctx = zmq.asyncio.Context()
    try:
        broker = Broker(
            ctx,
            cfg.endpoints.client,
            journal,
            cfg.limits,
            max_attempts=cfg.jobs.max_attempts,
            heartbeat=Heartbeat(cfg.workers.heartbeat_ms / 1000, cfg.workers.dead_after_ms / 1000),
            backend_endpoint=f"ipc://{run_dir}/broker",
            keys=keys(cfg, gateway_key),
        )
    except BaseException:
        await journal.close()
        ctx.destroy(0)
        remove_run(run_dir)
        raise
    serving = asyncio.create_task(broker.run())
    gateway = Gateway(cfg, door, broker.endpoint, run_dir) if door is not None else None
    keeping = asyncio.create_task(gateway.keep()) if gateway is not None else None
    try:
        unstartable = await supervise(cfg, broker, run_dir, stop)
    finally:
        if gateway is not None and keeping is not None:
            await gateway.close()  # after the drain: its in-flight requests have their answers
            keeping.cancel()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        broker.close()
        await journal.close()  # whatever is still held stays journaled for the next start
        ctx.term()
        remove_run(run_dir)
    if unstartable:
        print(
            f"baton up: the workers of replica {unstartable[0]} could not start "
            "(their error is above)",
            file=sys.stderr,
        )
        return 1
    return 0


def make_pool(cfg: Config, run_dir: Path) -> None:
    """The shared region for the weights over the workers' budget (workers/pool.py), when any
    are: sized by the plan every worker makes alike, empty until the workers load into it."""
    if cfg.memory.weight_budget >= 1:
        return
    p = cfg.parallel
    info = load_info(cfg.model.path)
    m = cfg.memory
    screen = screens(cfg.model.screen_greedy, cfg.device)  # as every worker plans it
    plan = layout(
        info, p.tensor, p.pipeline, cfg.model.dtype, p.stages, m.weight_budget, cfg.device, screen
    )
    Region.create(path_for(run_dir), plan.size).close()


def remove_run(run_dir: Path) -> None:
    """The run's files: its private directory, its pool if it had one, and the shared-memory
    regions of tensor-parallel groups (each removed once joined, unless a crash came first)."""
    path_for(run_dir).unlink(missing_ok=True)
    for region in Path("/dev/shm").glob(f"{run_dir.name}-*.reduce"):
        region.unlink(missing_ok=True)
    shutil.rmtree(run_dir, ignore_errors=True)


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


def missing_model(path: str, config: str) -> str:
    """How to get a model directory that is not there yet ("" when it is there: the error was
    something else)."""
    if path.startswith("package:"):
        return ""
    directory = Path(path).expanduser()
    if (directory / "config.json").is_file():
        return ""
    return (
        f"\nThere is no model at {directory} yet. To make a GPT-2-layout one with random weights "
        f"there (no download; its text is noise), run:\n"
        f"    baton demo --task generate --config {config}\n"
        f"or point model.path at a Hugging Face model directory (config.json, "
        f"model.safetensors, tokenizer.json): --set model.path=DIR"
    )


def keys(cfg: Config, also: tuple[bytes, ...] = ()) -> Keys | None:
    e = cfg.endpoints
    return Keys(e.server_key, e.client_keys, also) if e.client_keys else None


def check_keys(cfg: Config) -> None:
    """Refuse unusable key settings before anything starts, naming the key."""
    e = cfg.endpoints
    if bool(e.client_keys) != bool(e.server_key):
        raise ConfigError(
            "config keys 'endpoints.client_keys' and 'endpoints.server_key' go together: "
            "set both (keys required) or neither (an open endpoint)"
        )
    if not e.client_keys:
        return
    if not Path(e.client_keys).is_dir():
        raise ConfigError(f"config key 'endpoints.client_keys': {e.client_keys} is not a directory")
    try:
        _, secret = zmq.auth.load_certificate(e.server_key)
    except (OSError, ValueError) as err:
        raise ConfigError(f"config key 'endpoints.server_key': {err}") from None
    if secret is None:
        raise ConfigError(
            f"config key 'endpoints.server_key': {e.server_key} holds no secret key "
            "(name the .key_secret file `baton keys` wrote)"
        )


def check_private(run_dir: Path) -> None:
    """The run directory must be ours and 0700, and no directory above it may let another user
    swap it out (writable by others without the sticky bit): say so loudly if one does."""
    st = run_dir.stat()
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) != 0o700:
        raise RuntimeError(f"run directory {run_dir} is not private (mode {st.st_mode:o})")
    for parent in run_dir.resolve().parents:
        mode = parent.stat().st_mode
        if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
            log.warning(
                "%s is writable by other users without the sticky bit: they could replace the "
                "run directory %s; set TMPDIR to a private directory",
                parent,
                run_dir,
            )


async def supervise(cfg: Config, broker: Broker, run_dir: Path, stop: asyncio.Event) -> list[int]:
    """Keep parallel.replicas controllers running until asked to stop; then drain and stop them.
    `ready` is printed once every replica has registered. Returns the replicas whose workers
    could not start (which stops the rest: a fleet that cannot start is not waited on)."""
    n = cfg.parallel.replicas
    arrived = [asyncio.Event() for _ in range(n)]
    procs: list[asyncio.subprocess.Process | None] = [None] * n
    unstartable: list[int] = []
    replicas = [
        asyncio.create_task(replica(i, cfg, broker, run_dir, stop, procs, arrived[i], unstartable))
        for i in range(n)
    ]
    everyone = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in arrived)))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({everyone, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if everyone.done():
        print(f"ready {broker.endpoint}", flush=True)
    else:
        everyone.cancel()
        await asyncio.gather(everyone, return_exceptions=True)
    await asyncio.gather(*replicas)
    stopping.cancel()
    drained = await broker.drain(DRAIN_TIMEOUT_S)
    if not drained:
        log.warning("drain timed out with jobs still held")
    await asyncio.gather(*(end(p, broker) for p in procs if p is not None))
    return unstartable


async def replica(
    index: int,
    cfg: Config,
    broker: Broker,
    run_dir: Path,
    stop: asyncio.Event,
    procs: list[asyncio.subprocess.Process | None],
    arrived: asyncio.Event,
    unstartable: list[int],
) -> None:
    """Replica `index`'s controller, started again whenever it dies, until `stop`; its last
    process is left in procs[index] for the drain and stop. If its workers cannot start before it
    has ever registered, it is added to `unstartable` and everything stops."""
    failures = 0
    stopping = asyncio.create_task(stop.wait())
    while True:
        proc = procs[index] = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "controller.controller",
            "--config-json",
            json.dumps(cfg.to_dict()),
            "--broker",
            broker.backend,
            "--run-dir",
            str(run_dir),
            "--replica",
            str(index),
            stdin=asyncio.subprocess.DEVNULL,
        )
        exited = asyncio.create_task(proc.wait())
        if not arrived.is_set():
            registered = asyncio.create_task(broker.arrival(identity(proc.pid)).wait())
            await asyncio.wait({registered, exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if registered.done():
                arrived.set()
            registered.cancel()
        adrift = asyncio.create_task(unregistered(broker, identity(proc.pid), cfg))
        await asyncio.wait({exited, stopping, adrift}, return_when=asyncio.FIRST_COMPLETED)
        adrift.cancel()
        if stop.is_set():
            break
        if proc.returncode == UNSTARTABLE and not arrived.is_set():
            unstartable.append(index)
            stop.set()
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
        log.error(
            "replica %d: controller exited with code %s; restarting in %.1f s",
            index,
            proc.returncode,
            delay,
        )
        try:
            async with asyncio.timeout(delay):  # a restart backoff that a stop cuts short
                await stop.wait()
            break
        except TimeoutError:
            continue
    stopping.cancel()


async def end(proc: asyncio.subprocess.Process, broker: Broker) -> None:
    """Stop a controller after the drain: the broker's `stop` reaches a registered one."""
    if proc.returncode is not None:
        return
    if identity(proc.pid) not in broker.controllers:
        proc.terminate()  # never registered, so it cannot hear the broker's `stop`
    try:
        async with asyncio.timeout(STOP_TIMEOUT_S):
            await proc.wait()
    except TimeoutError:
        log.error("controller did not stop in %.0f s; killing it", STOP_TIMEOUT_S)
        proc.kill()
        await proc.wait()
