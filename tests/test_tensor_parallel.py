"""Tensor parallelism with real gloo groups: one spawned process per (stage, TP rank)."""

from __future__ import annotations

import queue
import socket
import time
import traceback

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from corpus import MODEL, reference, texts

from workers.layers.attention import Context
from workers.layers.parallel import close, init_tp_group
from workers.models import build, load_info
from workers.tokenizer import Tokenizer

MIN_COSINE = 0.9999
WAIT_S = 120  # generous bound for a loaded 2-core machine; the test never sleeps


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(
    stage: int,
    pipeline: int,
    tp_rank: int,
    tp: int,
    port: int,
    seqs: list[list[int]],
    inbox: mp.Queue,
    results: mp.Queue,
) -> None:
    """Build this rank's shard of one stage, run the batch once, report the output."""
    torch.set_num_threads(1)
    group = None
    try:
        group = init_tp_group(tp_rank, tp, f"tcp://127.0.0.1:{port}", "cpu", timeout_s=WAIT_S)
        model = build(load_info(MODEL), stage, pipeline, group)
        seq_lens = [len(s) for s in seqs]
        if stage == 0:
            x = torch.tensor([t for s in seqs for t in s], dtype=torch.int64)
        else:
            x = torch.from_numpy(inbox.get(timeout=WAIT_S))
        with torch.inference_mode():
            y = model(x, Context.encoder(seq_lens, False, torch.device("cpu")))
        results.put((stage, tp_rank, y.numpy()))
    except BaseException:
        results.put((stage, tp_rank, traceback.format_exc()))
    finally:
        if group is not None:
            close(group)


def run(seqs: list[list[int]], tp: int, pipeline: int) -> dict[tuple[int, int], np.ndarray]:
    """Every rank's output, keyed (stage, tp_rank). The parent relays hidden states between
    stages, as the broker would."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    inboxes = {(s, r): ctx.Queue() for s in range(pipeline) for r in range(tp)}
    ports = [free_port() for _ in range(pipeline)]
    procs = [
        ctx.Process(
            target=worker,
            args=(s, pipeline, r, tp, ports[s], seqs, inboxes[s, r], results),
            daemon=True,
        )
        for s in range(pipeline)
        for r in range(tp)
    ]
    outputs: dict[tuple[int, int], np.ndarray] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + WAIT_S
        while len(outputs) < len(procs):
            try:
                # Short gets so a child that died without reporting fails the test at once.
                stage, rank, out = results.get(timeout=1)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    pytest.fail(f"children exit codes {dead}; results so far {sorted(outputs)}")
                continue
            if isinstance(out, str):
                pytest.fail(f"stage {stage} rank {rank} failed:\n{out}")
            outputs[stage, rank] = out
            if rank == 0 and stage + 1 < pipeline:
                for r in range(tp):
                    inboxes[stage + 1, r].put(out)
        for p in procs:
            p.join(timeout=WAIT_S)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    return outputs


@pytest.fixture(scope="module")
def batch() -> tuple[list[list[int]], torch.Tensor]:
    corpus = texts(30, seed=1)
    seqs = [e.ids for e in Tokenizer(load_info(MODEL)).encode(corpus)]
    return seqs, reference(corpus)


@pytest.mark.parametrize(("tp", "pipeline"), [(2, 1), (2, 2)])
def test_tensor_parallel_matches_reference(batch, tp, pipeline):
    seqs, expected = batch
    outputs = run(seqs, tp, pipeline)
    last = pipeline - 1
    got = torch.from_numpy(outputs[last, 0])
    cosine = F.cosine_similarity(got, expected)
    assert cosine.min().item() >= MIN_COSINE, cosine
    # After each row-parallel all-reduce every rank holds the same activations.
    for (stage, _), out in outputs.items():
        np.testing.assert_allclose(out, outputs[stage, 0], atol=1e-6)
    assert all(p.shape == (len(seqs), 384) for (s, _), p in outputs.items() if s == last)
