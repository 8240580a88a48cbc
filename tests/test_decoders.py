"""GPT-2 and Llama stages against transformers, in one process: the model code, the paged KV
cache and its metadata, chunked prefill, sequences joining mid-generation, a shared prefix read
from another sequence's blocks, and pipeline stages in a row. (Tensor parallel and the whole
fleet: tests/test_generate.py.)"""

from __future__ import annotations

import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from decoders import A, B, C, Engine, check_greedy, gpt2, llama, scenario

from workers.layers.parallel import close, init_tp_group
from workers.sampler import sample

WAIT_S = 120  # generous bound for a loaded 2-core machine; the test never sleeps


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def checkpoint(request, tmp_path_factory):
    make = {"gpt2": gpt2, "llama": llama}[request.param]
    return make(tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize(
    "pipeline,compiled", [(1, False), (2, False), (1, True)], ids=["pp1", "pp2", "pp1-compiled"]
)
def test_greedy_matches_transformers(checkpoint, pipeline, compiled):
    out = scenario(Engine(checkpoint, pipeline, compiled=compiled, screen=compiled))
    for seq, prompt in ((0, A), (1, B), (2, C)):
        check_greedy(checkpoint, prompt, out[seq])


def test_tensor_parallel_matches_transformers(checkpoint):
    # two ranks, each its half of the heads (Llama's one KV head on both), MLP and vocabulary
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=rank_main, args=(str(checkpoint), r, port, results), daemon=True)
        for r in range(2)
    ]
    got: dict[int, object] = {}
    try:
        for p in procs:
            p.start()
        for _ in procs:
            rank, out = results.get(timeout=WAIT_S)
            assert not isinstance(out, str), out
            got[rank] = out
    finally:
        for p in procs:
            p.join(timeout=WAIT_S)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    assert got[0] == got[1]  # every rank takes the same tokens (the best of each rank's words)
    for seq, prompt in ((0, A), (1, B), (2, C)):
        check_greedy(checkpoint, prompt, got[0][seq])


def rank_main(directory: str, rank: int, port: int, results) -> None:
    torch.set_num_threads(1)
    group = None
    try:
        group = init_tp_group(rank, 2, f"tcp://127.0.0.1:{port}", "cpu", timeout_s=WAIT_S)
        results.put((rank, scenario(Engine(directory, 1, group, screen=True))))
    except BaseException:
        results.put((rank, traceback.format_exc()))
    finally:
        if group is not None:
            close(group)


def test_seeded_sampling_is_a_function_of_seed_and_position():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    rows = [[0, 0.8, 0, 1.0, 7, 0], [1, 1.0, 10, 0.9, 7, 0], [2, 1.0, 0, 1.0, 7, 3]]
    first = sample(logits, rows)
    # the same rows alone, or in another order among other rows, draw the same tokens
    assert sample(logits[1:2], [rows[1]]) == first[1:2]
    assert sample(logits[[2, 0]], [rows[2], rows[0]]) == [first[2], first[0]]
    # another seed or another position draws from another stream
    draws = {tuple(sample(logits[:1], [[0, 5.0, 0, 1.0, s, 0]])) for s in range(20)}
    assert len(draws) > 1
    # top-k 1 and a tiny top-p are greedy whatever the seed
    greedy = int(logits[0].argmax())
    assert sample(logits[:1], [[0, 1.0, 1, 1.0, 3, 0]]) == [greedy]
    assert sample(logits[:1], [[0, 1.0, 0, 1e-6, 3, 0]]) == [greedy]


def test_bfloat16_logits_sample_as_their_float32_values():
    torch.manual_seed(2)
    logits = torch.randn(4, 300).bfloat16()
    logits[1, 7] = logits[1, 200] = logits[1].max() + 1  # a tie: the first wins, as argmax
    rows = [[i, 0.0, 0, 1.0, -1, 0] for i in range(3)] + [[3, 0.7, 5, 0.9, 11, 2]]
    wide = logits.float()
    assert sample(logits, rows) == sample(wide, rows)
    assert sample(logits, rows)[:3] == wide[:3].argmax(-1).tolist()
    assert sample(logits, rows)[1] == 7
