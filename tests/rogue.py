"""A hostile local process for tests/test_security.py: it attacks a fleet's internal endpoints.

Run as root: it imports what it needs, then drops to another user (default nobody, 65534)
before it opens any socket, so the kernel judges every connect as that user's. (Dropping
in-process rather than `subprocess(user=...)` because the interpreter may live where that user
cannot even exec it, e.g. under /root.)

stdin: one JSON line, the plan:
    {"uid": 65534, "gid": 65534, "model": str,
     "broker": [ipc endpoints of the broker's controller ROUTER],
     "ctl": [the controller's worker-control ROUTERs],
     "stage0": [PULLs fed with token ids], "stageN": [PULLs fed with hidden states],
     "results": [the controller's results PULLs]}
It then sends, on every endpoint, what would hurt if it got through: `ready` with a huge credit
to the broker (a real controller then receives other clients' jobs), `hello`/`ready`/`failed`
as a worker to ctl, forged `batch` messages to the workers and forged `output` messages for
the first batch ids to the results socket. It prints `armed`, keeps listening (and resending)
until stdin closes (or `bound_s`, default 300, passes), printing `received ROLE` for anything
that arrives, then one JSON report: for each endpoint, what a plain AF_UNIX connect said (`ok`
or the errno name), how many messages it managed to queue, and what it received.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys

import torch
import zmq

from wire.protocol import Kind, encode

HIDDEN = 384
FORGED_BATCHES = 64  # output ids 0..63: a young fleet's batches


def raw_connect(endpoint: str) -> str:
    """What the kernel says to this user connecting to the ipc socket file."""
    path = endpoint.removeprefix("ipc://")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e))
    finally:
        s.close()
    return "ok"


def forged_batch(batch: int, hidden: bool) -> list:
    # stage 0 takes token ids; later stages take hidden states
    x = torch.full((4, HIDDEN), 1e4) if hidden else torch.full((4,), 1012, dtype=torch.int64)
    return encode(Kind.BATCH, {"batch": batch, "task": "embed", "seq_lens": [4]}, [x])


def main() -> int:
    plan = json.loads(sys.stdin.readline())
    os.setgroups([])
    os.setgid(plan.get("gid", 65534))
    os.setuid(plan.get("uid", 65534))
    ctx = zmq.Context()
    attacks: list[tuple[str, str, zmq.Socket, list[list]]] = []

    def add(role: str, endpoint: str, kind: int, messages: list[list]) -> zmq.Socket:
        sock = ctx.socket(kind)
        sock.linger = 0
        if kind == zmq.DEALER and role == "ctl":
            sock.setsockopt(zmq.IDENTITY, b"w0")  # pose as worker 0
        sock.connect(endpoint)
        attacks.append((role, endpoint, sock, messages))
        return sock

    for ep in plan.get("broker", []):
        add(
            "broker",
            ep,
            zmq.DEALER,
            [
                encode(
                    Kind.READY,
                    {
                        "model": plan["model"],
                        "tasks": ["embed", "echo"],
                        "layout": {"tensor": 1, "pipeline": 1},
                        "workers": [],
                        "pid": os.getpid(),
                    },
                ),
                encode(Kind.CREDIT, {"n": 1_000_000}),
            ],
        )
    for ep in plan.get("ctl", []):
        add(
            "ctl",
            ep,
            zmq.DEALER,
            [
                encode(Kind.HELLO, {"rank": 0, "stage": 0, "tp_rank": 0, "pid": 1, "device": "x"}),
                encode(Kind.READY, {"rank": 0}),
                encode(Kind.FAILED, {"rank": 0, "batch": 0, "code": "internal", "message": "x"}),
            ],
        )
    for ep in plan.get("stage0", []):
        add("stage0", ep, zmq.PUSH, [forged_batch(b, False) for b in range(FORGED_BATCHES)])
    for ep in plan.get("stageN", []):
        add("stageN", ep, zmq.PUSH, [forged_batch(b, True) for b in range(FORGED_BATCHES)])
    for ep in plan.get("results", []):
        fake = torch.ones(1, HIDDEN) / HIDDEN**0.5
        outputs = [
            encode(Kind.OUTPUT, {"batch": b, "task": "embed", "seq_lens": [4]}, [fake])
            for b in range(FORGED_BATCHES)
        ]
        add("results", ep, zmq.PUSH, outputs)

    report = [
        {"role": role, "endpoint": ep, "raw": raw_connect(ep), "queued": 0, "received": []}
        for role, ep, _, _ in attacks
    ]

    def fire() -> None:
        for (_, _, sock, messages), rep in zip(attacks, report, strict=True):
            for frames in messages:
                try:
                    sock.send_multipart(frames, flags=zmq.NOBLOCK)
                    rep["queued"] += 1
                except zmq.Again:
                    break

    fire()
    print("armed", flush=True)
    poller = zmq.Poller()
    for _, _, sock, _ in attacks:
        if sock.type == zmq.DEALER:
            poller.register(sock, zmq.POLLIN)
    poller.register(sys.stdin.fileno(), zmq.POLLIN)
    waited, bound = 0.0, float(plan.get("bound_s", 300))  # never outlive a careless test
    done = False
    while waited < bound and not done:
        events = dict(poller.poll(1000))
        waited += 1.0
        if sys.stdin.fileno() in events and not os.read(sys.stdin.fileno(), 4096):
            done = True  # the test is finished with us: report what arrived so far
        for (role, _, sock, _), rep in zip(attacks, report, strict=True):
            while sock.type == zmq.DEALER and sock.poll(0):
                frames = sock.recv_multipart()
                rep["received"].append(frames[0][:200].decode("latin-1"))
                print(f"received {role}", flush=True)
        fire()  # keep trying: a connection that opened late would carry these at once
    for _, _, sock, _ in attacks:
        sock.close(0)
    ctx.term()
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
