"""All-reduce through shared memory (workers/layers/shared_reduce.py) in real spawned processes
with a real gloo group: every rank holds bitwise the rank-order sum, for several dtypes, shapes and
turns in a row; what does not fit a slot goes through gloo; the names are gone once joined; a peer
that dies is an error, not a hang."""

from __future__ import annotations

import hashlib
import queue
import socket
import time
import traceback
import uuid
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from workers.layers.parallel import close, init_tp_group
from workers.layers.shared_reduce import SLOT

WAIT_S = 120
CASES = [
    (torch.float32, (4089, 384)),
    (torch.bfloat16, (7, 512)),
    (torch.float32, (1,)),
    (torch.float32, (SLOT // 4 + 1,)),  # one element past a slot: through gloo
]


def inputs(rank: int, turn: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + turn)
    return torch.randn(shape, generator=g).to(dtype)


def member(rank: int, size: int, port: int, region: Path, fifos: Path, out: mp.Queue, die: bool):
    torch.set_num_threads(1)
    group = None
    try:
        group = init_tp_group(
            rank, size, f"tcp://127.0.0.1:{port}", "cpu", timeout_s=WAIT_S, shared=(region, fifos)
        )
        if die and rank == size - 1:
            out.put((rank, "left"))
            return  # exits: its FIFO's write end closes with it
        results = []
        for turn, (dtype, shape) in enumerate(CASES * 2):
            t = inputs(rank, turn, dtype, shape)
            group.all_reduce(t)
            want = sum(
                (inputs(r, turn, dtype, shape) for r in range(1, size)),
                inputs(0, turn, dtype, shape),
            )
            if t.numel() * t.element_size() <= SLOT:
                same = torch.equal(t, want)
            else:  # gloo's own order of summing
                same = torch.allclose(t, want, rtol=1e-5, atol=1e-5)
            # a digest of the bits, to hold the ranks to one another
            results.append((same, hashlib.sha1(t.view(torch.uint8).numpy()).hexdigest()))
        # each removed its names before its first signal: the names are gone, the group works
        assert not region.exists() and not list(fifos.parent.glob("*.fifo.*"))
        out.put((rank, results))
    except BaseException as e:
        out.put((rank, f"{type(e).__name__}: {traceback.format_exc()}"))
    finally:
        if group is not None and not (die and rank == size - 1):
            close(group)


def run(size: int, tmp_path: Path, die: bool = False) -> dict[int, object]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    region = Path("/dev/shm") / f"baton-test-{uuid.uuid4().hex}.reduce"
    procs = [
        ctx.Process(target=member, args=(r, size, port, region, tmp_path / "g.fifo", out, die))
        for r in range(size)
    ]
    got: dict[int, object] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + WAIT_S
        while len(got) < size and time.monotonic() < deadline:
            try:
                rank, value = out.get(timeout=1)
            except queue.Empty:
                continue
            got[rank] = value
        for p in procs:
            p.join(timeout=WAIT_S)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        region.unlink(missing_ok=True)
    assert len(got) == size, got
    return got


@pytest.mark.parametrize("size", [2, 3])
def test_every_rank_holds_the_rank_order_sum(size, tmp_path):
    got = run(size, tmp_path)
    for rank, results in got.items():
        assert isinstance(results, list), results
        assert all(same for same, _ in results), (rank, results)
    assert len({tuple(d for _, d in results) for results in got.values()}) == 1


def test_a_peer_that_dies_is_an_error_not_a_hang(tmp_path):
    got = run(2, tmp_path, die=True)
    assert got[1] == "left"
    assert isinstance(got[0], str) and got[0].startswith("ConnectionError"), got[0]
