"""The HTTP gateway's process, seen from `baton up`: its settings checked and its socket bound
before anything starts (a refusal costs nothing), then the process started, started again if
it dies, and stopped after the broker has drained (so in-flight HTTP requests get their answers).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.config import Config, ConfigError

log = logging.getLogger("baton.up")

STOP_TIMEOUT_S = 40.0  # past the gateway's own 30 s for in-flight requests
RESTART_BACKOFF_S = (0.5, 1, 2, 5, 10)


@dataclass(slots=True)
class Door:
    """What the gateway process needs: its bound socket, keys and the model's text files."""

    sock: socket.socket
    keys: list[str]
    model_dir: Path
    tokenizer: Path | None
    curve_key: str = ""  # its secret certificate, where the client endpoint requires keys
    server_key: str = ""  # the broker's certificate, likewise

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def address(listen: str) -> tuple[str, int]:
    """`HOST:PORT` (`[V6]:PORT` for IPv6) of `gateway.listen`."""
    host, sep, port = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"config key 'gateway.listen' must be HOST:PORT (or \"\"), got {listen!r}"
        )
    return host, int(port)


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def keys(cfg: Config) -> list[str]:
    """`gateway.api_keys` and the lines of `gateway.api_key_file` (blank and # lines skipped)."""
    out = list(cfg.gateway.api_keys)
    path = cfg.gateway.api_key_file
    if path:
        try:
            lines = Path(path).expanduser().read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"config key 'gateway.api_key_file': {e}") from None
        out += [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
        if len(out) == len(cfg.gateway.api_keys):
            raise ConfigError(f"config key 'gateway.api_key_file': {path} holds no key")
    return out


def bind(cfg: Config, info: Any) -> Door | None:
    """Check the gateway's settings and bind its socket (None: no gateway). A non-loopback
    address without API keys is refused: it would serve anyone who can reach it."""
    if not cfg.gateway.listen:
        return None
    host, port = address(cfg.gateway.listen)
    allowed = keys(cfg)
    if not loopback(host) and not allowed:
        raise ConfigError(
            f"gateway.listen = {cfg.gateway.listen!r} is not a loopback address and no API keys "
            "are set: anyone who can reach it could use the fleet. Set gateway.api_keys (or "
            "gateway.api_key_file), or listen on 127.0.0.1"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        # listening from here on: a connection made before the gateway process is up waits
        sock.listen(1024)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on gateway.listen = {cfg.gateway.listen!r}: {e}") from None
    sock.set_inheritable(True)
    return Door(sock, allowed, info.path, info.tokenizer)


def admit(door: Door | None, cfg: Config, run_dir: Path) -> tuple[bytes, ...]:
    """Where the client endpoint requires CURVE keys, the gateway is a client like any other:
    it gets a key pair of its own in the private run directory, and the broker lets its public
    key in (returned). Every HTTP job then belongs to that key; the API keys guard the door."""
    if door is None or not cfg.endpoints.client_keys:
        return ()
    import zmq.auth

    public, secret = zmq.auth.create_certificates(run_dir, "gateway")
    door.curve_key, door.server_key = secret, cfg.endpoints.server_key
    return (zmq.auth.load_certificate(public)[0],)


class Gateway:
    """The gateway process: `keep` runs it (again after a death) until stopped; `close` stops it."""

    def __init__(self, cfg: Config, door: Door, broker: str, run_dir: Path) -> None:
        self.cfg, self.door, self.broker = cfg, door, broker
        # the Batch API's state lives beside the journal; with a temporary journal, in the run's
        # temporary directory (it survives a gateway restart, not a restart of `baton up`)
        journal = cfg.journal.path
        self.batch_dir = Path(journal + ".batches") if journal else run_dir / "batches"
        self.proc: asyncio.subprocess.Process | None = None
        self.closing = False

    async def keep(self) -> None:
        failures = 0
        while not self.closing:
            self.proc = await self._start()
            code = await self.proc.wait()
            if self.closing:
                return
            delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
            failures += 1
            log.error("gateway exited with code %s; restarting in %.1f s", code, delay)
            await asyncio.sleep(delay)  # restart backoff, not synchronisation

    async def close(self) -> None:
        self.closing = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await proc.wait()
            except TimeoutError:
                log.error("gateway did not stop in %.0f s; killing it", STOP_TIMEOUT_S)
                proc.kill()
                await proc.wait()
        self.door.sock.close()

    async def _start(self) -> asyncio.subprocess.Process:
        d = self.door
        fd = d.sock.fileno()
        args = ["--broker", self.broker, "--fd", str(fd), "--model-dir", str(d.model_dir)]
        args += ["--batch-dir", str(self.batch_dir)]
        if d.tokenizer is not None:
            args += ["--tokenizer", str(d.tokenizer)]
        if d.curve_key:
            args += ["--curve-key", d.curve_key, "--server-key", d.server_key]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broker.gateway",
            *args,
            stdin=asyncio.subprocess.PIPE,
            pass_fds=(fd,),
        )
        raw = self.cfg.to_dict()
        raw["gateway"]["keys"] = d.keys  # on its stdin: never on a command line
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(raw).encode())
        await proc.stdin.drain()
        proc.stdin.close()
        log.info("gateway %d serving %s for %s", proc.pid, d.url, self.broker)
        return proc
