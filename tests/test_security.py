"""Who can reach what (docs/security.md), tested against real fleets and a real hostile process.

- Internal endpoints: a process of another user (tests/rogue.py, dropped to nobody) tries every
  internal socket of a tensor 2 x pipeline 2 fleet while a client's jobs flow; it must get
  nothing and inject nothing, and the client's embeddings must still equal
  sentence-transformers'. The same rogue against sockets that let it in proves it really tries.
- Nothing of a fleet listens on a non-loopback TCP address.
- Keys: with endpoints.client_keys, a client without an allowed key gets nothing, and a job
  belongs to the key that submitted it.
- Ids: broker-made ids are random; a reused id with other content is `duplicate_id`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgpack
import openai
import pytest
import torch
import zmq
from conftest import dealer, start
from corpus import reference, texts

from baton.client import BlockingClient, Client
from baton.launch import REPO, Fleet
from broker.jobs import new_id
from broker.journal import Journal
from wire.protocol import Kind, Limits, decode, encode

BATON = [sys.executable, "-m", "baton.cli"]
ROGUE = [sys.executable, str(Path(__file__).parent / "rogue.py")]
NOBODY = 65534
root_only = pytest.mark.skipif(
    os.geteuid() != 0, reason="the rogue must run as another user, which needs root to arrange"
)


def baton(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BATON, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


class Rogue:
    """tests/rogue.py as nobody: armed once it has sent everything; reports when told to stop."""

    def __init__(self, plan: dict) -> None:
        self.proc = subprocess.Popen(
            ROGUE,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"uid": NOBODY, "gid": NOBODY, **plan}) + "\n")
        self.proc.stdin.flush()
        self.armed = self.proc.stdout.readline().strip()
        assert self.armed == "armed", self.proc.stderr.read() if self.proc.stderr else ""

    def wait_for(self, line: str) -> None:
        """Read the rogue's output until `line` (bounded by the plan's bound_s)."""
        assert self.proc.stdout is not None
        for got in self.proc.stdout:
            if got.strip() == line:
                return
        raise AssertionError(f"the rogue exited without printing {line!r}")

    def finish(self) -> list[dict]:
        out, err = self.proc.communicate(timeout=120)  # closes stdin: the signal to report
        assert self.proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def internals(fleet: Fleet, status: dict) -> tuple[Path, dict]:
    """The fleet's run directory and internal endpoints, read from its processes' command lines
    (what any local user can read in /proc)."""
    [ctrl] = status["controllers"]
    argv = cmdline(ctrl["pid"])
    run_dir = Path(arg(argv, "--run-dir"))
    plan: dict[str, list[str]] = {
        "broker": [arg(argv, "--broker")],
        "ctl": [],
        "stage0": [],
        "stageN": [],
        "results": [],
    }
    for w in status["workers"]:
        spec = json.loads(cmdline(w["pid"])[-1])
        plan["ctl"].append(spec["ctl"])
        plan["stage0" if spec["stage"] == 0 else "stageN"].append(spec["inp"])
        if spec["out"].endswith("/results"):
            plan["results"].append(spec["out"])
    plan["ctl"] = sorted(set(plan["ctl"]))
    return run_dir, {"model": status["model"], **plan}


@pytest.fixture(scope="module")
def tp_pp_fleet() -> Iterator[Fleet]:
    fleet = start("parallel.tensor=2", "parallel.pipeline=2")
    try:
        yield fleet
    finally:
        fleet.stop()


@root_only
def test_rogue_of_another_user_gets_nothing_and_injects_nothing(tp_pp_fleet: Fleet) -> None:
    corpus = [t for t in texts(96, seed=12) if t.strip()]
    with BlockingClient(tp_pp_fleet.endpoint, timeout_s=180) as client:
        before = client.status()
        run_dir, plan = internals(tp_pp_fleet, before)
        assert all(ep.startswith("ipc://") for k in plan if k != "model" for ep in plan[k])
        assert all(len(plan[k]) >= 1 for k in ("broker", "ctl", "stage0", "stageN", "results"))
        # every directory from the run dir down to the sockets is the fleet's alone
        for d in (run_dir, *{Path(ep.removeprefix("ipc://")).parent for ep in plan["ctl"]}):
            st = d.stat()
            assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700, d
        rogue = Rogue(plan)
        try:
            # the rogue has said `ready` with a million credits and pushed its forgeries; jobs
            # now flow while it listens for any of them
            results = client.embed(corpus)
            after = client.status()
            report = rogue.finish()
        finally:
            rogue.kill()
    for entry in report:
        assert entry["raw"] == "EACCES", entry  # the kernel refused nobody at the socket file
        assert entry["received"] == [], entry  # no job, no heartbeat, nothing
    assert {e["role"] for e in report} == {"broker", "ctl", "stage0", "stageN", "results"}
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    got = torch.tensor([r.embedding for r in results])
    assert cosine(got, reference(corpus)).min().item() >= 0.9999
    # the fleet noticed nothing: one controller (the rogue never registered), no restarts
    assert [c["pid"] for c in after["controllers"]] == [c["pid"] for c in before["controllers"]]
    assert all(w["restarts"] == 0 and w["state"] == "ready" for w in after["workers"])


@root_only
def test_the_rogue_really_attacks_sockets_that_let_it_in(tmp_path: Path) -> None:
    """The control: the same rogue, as nobody, against ipc sockets it may open, delivers its
    `ready` and its forgeries and receives what the broker-side socket sends it."""
    open_dir = Path(tempfile.mkdtemp(prefix="baton-open-"))
    open_dir.chmod(0o755)
    ctx = zmq.Context()
    socks = {
        "broker": ctx.socket(zmq.ROUTER),
        "ctl": ctx.socket(zmq.ROUTER),
        "stage0": ctx.socket(zmq.PULL),
        "results": ctx.socket(zmq.PULL),
    }
    rogue = None
    try:
        plan: dict = {"model": "m"}
        for role, sock in socks.items():
            sock.linger = 0
            sock.rcvtimeo = 60_000  # bounded: a rogue that never delivers fails, not hangs
            ep = f"ipc://{open_dir}/{role}"
            sock.bind(ep)
            Path(ep.removeprefix("ipc://")).chmod(0o777)
            plan[role] = [ep]
        rogue = Rogue({**plan, "bound_s": 120})
        ident, *frames = socks["broker"].recv_multipart()
        assert decode(frames, Limits()).kind == Kind.READY
        socks["broker"].send_multipart([ident, *encode(Kind.JOBS, {"jobs": []})])
        _, *frames = socks["ctl"].recv_multipart()
        assert decode(frames, Limits()).kind == Kind.HELLO
        assert decode(socks["stage0"].recv_multipart(), Limits()).kind == Kind.BATCH
        assert decode(socks["results"].recv_multipart(), Limits()).kind == Kind.OUTPUT
        rogue.wait_for("received broker")  # our JOBS reply reached it
        report = rogue.finish()
        by_role = {e["role"]: e for e in report}
        assert all(e["raw"] == "ok" for e in report), report
        assert by_role["broker"]["received"], "the rogue did not read what the broker sent"
    finally:
        if rogue is not None:
            rogue.kill()
        for sock in socks.values():
            sock.close(0)
        ctx.term()
        shutil.rmtree(open_dir, ignore_errors=True)


def listening(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, local address, port) of every listening TCP socket these processes hold."""
    inodes: dict[str, int] = {}
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue  # closed meanwhile
            m = re.fullmatch(r"socket:\[(\d+)\]", target)
            if m:
                inodes[m.group(1)] = pid
    out = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            local, state, inode = f[1], f[3], f[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                addr, port = local.split(":")
                assert len(addr) == width
                out.append((inodes[inode], _address(addr), int(port, 16)))
    return out


def _address(hexaddr: str) -> str:
    raw = bytes.fromhex(hexaddr)
    # /proc prints each 32-bit word in host (little-endian) order
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def test_nothing_listens_beyond_loopback(tp_pp_fleet: Fleet) -> None:
    with BlockingClient(tp_pp_fleet.endpoint, timeout_s=60) as client:
        s = client.status()
    up = tp_pp_fleet.proc.pid
    pids = [up, *(c["pid"] for c in s["controllers"]), *(w["pid"] for w in s["workers"])]
    found = listening(pids)
    assert found, "the client endpoint at least must be listening"
    assert all(ipaddress.ip_address(a).is_loopback for _, a, _ in found), found
    # the broker's only TCP socket is the client endpoint: the controller endpoint is ipc://
    port = int(tp_pp_fleet.endpoint.rsplit(":", 1)[1])
    assert [(a, p) for pid, a, p in found if pid == up] == [("127.0.0.1", port)]
    # gloo pairs (tensor 2): the workers listen, on loopback only (checked above)
    assert {pid for pid, _, _ in found} - {up}, "expected gloo listeners on the workers"


# --- keys ---


def make_keys(where: Path, name: str) -> tuple[Path, Path]:
    done = baton("keys", str(where), "--name", name)
    assert done.returncode == 0, done.stderr
    public, secret = where / f"{name}.key", where / f"{name}.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    return public, secret


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    d = tmp_path_factory.mktemp("keys")
    server_pub, server_sec = make_keys(d / "server", "broker")
    allowed = d / "allowed"
    allowed.mkdir()
    keys = {"server": server_pub}
    for name in ("alice", "bob", "mallory"):
        pub, sec = make_keys(d / name, name)
        keys[name] = sec
        if name != "mallory":
            shutil.copy(pub, allowed / pub.name)
    fleet = start(
        f'endpoints.client_keys="{allowed}"', f'endpoints.server_key="{server_sec}"', gateway=True
    )
    try:
        yield {"fleet": fleet, **keys}
    finally:
        fleet.stop()


def test_gateway_gets_a_key_of_its_own(keyed: dict) -> None:
    """With client keys required, `baton up` makes the HTTP gateway a key pair the broker lets
    in: HTTP embeddings work (a key not on the list still gets nothing: below)."""
    http = openai.OpenAI(base_url=f"{keyed['fleet'].http}/v1", api_key="x", max_retries=0)
    got = http.embeddings.create(model="all-MiniLM-L6-v2", input="through the gateway")
    with as_(keyed, "alice") as alice:
        [want] = alice.embed(["through the gateway"])
    assert got.data[0].embedding == want.embedding


def as_(keyed: dict, who: str, timeout_s: float = 120) -> BlockingClient:
    return BlockingClient(
        keyed["fleet"].endpoint,
        timeout_s=timeout_s,
        curve_key=keyed[who],
        server_key=keyed["server"],
    )


def test_without_an_allowed_key_a_client_gets_nothing(keyed: dict) -> None:
    ep = keyed["fleet"].endpoint
    plain = baton("status", "--endpoint", ep, "--timeout", "3")
    assert plain.returncode == 1 and "no reply" in plain.stderr
    # a well-formed key the broker does not list: the handshake fails, nothing is answered
    outsider = baton(
        "status", "--endpoint", ep, "--timeout", "3",
        "--key", str(keyed["mallory"]), "--server-key", str(keyed["server"]),
    )  # fmt: skip
    assert outsider.returncode == 1 and "no reply" in outsider.stderr
    with as_(keyed, "mallory", timeout_s=3) as c, pytest.raises(TimeoutError):
        c.submit([{"id": "m-1", "task": "embed", "text": "let me in"}])
    allowed = baton(
        "status", "--endpoint", ep, "--json",
        "--key", str(keyed["alice"]), "--server-key", str(keyed["server"]),
    )  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["model"] == "all-MiniLM-L6-v2"


def test_a_job_belongs_to_its_key(keyed: dict, tmp_path: Path) -> None:
    job = {"id": "shared-name-1", "task": "embed", "text": "Alice's private sentence."}
    with as_(keyed, "alice") as alice:
        [mine] = alice.submit([job])
    assert mine.ok
    with as_(keyed, "bob") as bob:
        [stolen] = bob.submit([job])  # the same id and text: it would be Alice's result
        assert not stolen.ok and stolen.error["code"] == "duplicate_id"
        assert "shared-name-1" in stolen.error["message"] and stolen.embedding is None
        assert bob.cancel(["shared-name-1"]) == {"ids": [], "unknown": ["shared-name-1"]}
    # through the CLI too, with Bob's key: Alice's id is unknown to him
    done = baton(
        "cancel", "--endpoint", keyed["fleet"].endpoint,
        "--key", str(keyed["bob"]), "--server-key", str(keyed["server"]), "shared-name-1",
    )  # fmt: skip
    assert done.returncode == 0 and "unknown:   shared-name-1" in done.stdout
    with as_(keyed, "alice") as alice:
        [again] = alice.submit([job])  # Alice herself still gets her stored result
    assert again.ok and again.embedding == mine.embedding


async def test_another_key_cannot_cancel_a_live_job(keyed: dict) -> None:
    corpus = [t for t in texts(64, seed=3) if t.strip()]
    jobs = [{"id": f"alice-live-{i}", "task": "embed", "text": t} for i, t in enumerate(corpus)]
    ep, server = keyed["fleet"].endpoint, keyed["server"]
    async with (
        Client(ep, timeout_s=120, curve_key=keyed["alice"], server_key=server) as alice,
        Client(ep, timeout_s=120, curve_key=keyed["bob"], server_key=server) as bob,
    ):
        pending = await alice.submit(jobs)  # accepted: queued or running, whichever
        reply = await bob.cancel([j["id"] for j in jobs])
        assert reply["ids"] == [] and sorted(reply["unknown"]) == sorted(j["id"] for j in jobs)
        results = [await f for f in pending]
    assert all(r.ok for r in results)
    got = torch.tensor([r.embedding for r in results])
    assert cosine(got, reference(corpus)).min().item() >= 0.9999


# --- ids ---


def test_broker_made_ids_are_random(small_fleet: Fleet) -> None:
    made = {new_id() for _ in range(1000)}
    assert len(made) == 1000 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in made)
    with dealer(small_fleet.endpoint) as sock:
        sock.rcvtimeo = 120_000
        no_ids = [{"task": "echo", "text": f"anonymous {i}"} for i in range(3)]
        sock.send_multipart(encode(Kind.SUBMIT, {"jobs": no_ids, "ref": 1}))
        while True:
            msg = decode(sock.recv_multipart(), Limits())
            if msg.kind == Kind.ACCEPTED:
                break
    ids = msg.body["ids"]
    assert len(ids) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_reused_id_with_other_content_is_refused(small_fleet: Fleet) -> None:
    jid = f"conflict-{os.getpid()}"
    with BlockingClient(small_fleet.endpoint, timeout_s=120) as client:
        [first] = client.submit([{"id": jid, "task": "embed", "text": "the original text"}])
        [other] = client.submit([{"id": jid, "task": "embed", "text": "a different text"}])
        [echo] = client.submit([{"id": jid, "task": "echo", "text": "the original text"}])
        [same] = client.submit([{"id": jid, "task": "embed", "text": "the original text"}])
    assert first.ok
    for refused in (other, echo):
        assert refused.error["code"] == "duplicate_id" and jid in refused.error["message"]
    assert same.ok and same.embedding == first.embedding  # the idempotent retry, as before


# --- journal ---

OLD_SCHEMA = """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, model TEXT NOT NULL,
    task TEXT NOT NULL, text TEXT NOT NULL, deadline REAL, attempts INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL, finished REAL, entry BLOB, embedding BLOB
);
"""


async def test_an_old_journal_gains_the_owner_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    entry = msgpack.packb({"id": "done-1", "status": "ok", "tokens": 3, "truncated": False})
    db.execute(
        "INSERT INTO jobs(id, model, task, text, state, entry) VALUES "
        "('old-1','m','embed','t','queued',NULL), ('done-1','m','embed','u','done',?)",
        (entry,),
    )
    db.commit()
    db.close()
    journal = Journal(str(path))
    try:
        [row] = list(journal.unfinished())
        assert (row.id, row.owner) == ("old-1", None)
        assert journal.lookup(["done-1"])["done-1"].owner is None
        journal.add([("new-1", "m", "embed", "v", None, "KEY", None, None, 0)])
        await journal.commit()
        assert journal.lookup(["new-1"])["new-1"].owner == "KEY"
    finally:
        await journal.close()


def test_up_refuses_unusable_key_settings(tmp_path: Path) -> None:
    public, secret = make_keys(tmp_path / "k", "broker")
    config = str(REPO / "configs" / "minilm.toml")
    for sets, named in (
        ([f'endpoints.client_keys="{tmp_path}"'], "endpoints.server_key"),
        ([f'endpoints.server_key="{secret}"'], "endpoints.client_keys"),
        (
            [f'endpoints.client_keys="{tmp_path / "none"}"', f'endpoints.server_key="{secret}"'],
            "is not a directory",
        ),
        (
            [f'endpoints.client_keys="{tmp_path}"', f'endpoints.server_key="{public}"'],
            "holds no secret key",
        ),
    ):
        done = baton("up", "--config", config, *(a for s in sets for a in ("--set", s)))
        assert done.returncode == 2 and named in done.stderr, done.stderr
        assert "ready" not in done.stdout
    again = baton("keys", str(tmp_path / "k"), "--name", "broker")
    assert again.returncode == 2 and "not overwriting" in again.stderr
