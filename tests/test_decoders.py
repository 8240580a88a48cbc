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
from decoders import check_greedy, gpt2, llama

from workers.layers.parallel import TPGroup, close, init_tp_group
from workers.models import load_info
from workers.runner import ModelRunner
from workers.sampler import sample

BLOCK = 4
SOLO = TPGroup(0, 1, None)
WAIT_S = 120  # generous bound for a loaded 2-core machine; the test never sleeps


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def checkpoint(request, tmp_path_factory):
    make = {"gpt2": gpt2, "llama": llama}[request.param]
    return make(tmp_path_factory.mktemp(request.param))


class Engine:
    """Just enough of a scheduler to drive runners: each sequence owns fixed blocks, except
    that a sequence may start on another's full blocks (a shared prefix)."""

    def __init__(
        self,
        directory,
        pipeline: int,
        tp: TPGroup = SOLO,
        compiled: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        info = load_info(str(directory))
        self.runners = [
            ModelRunner(
                info,
                s,
                pipeline,
                tp,
                dtype=dtype,
                block_size=BLOCK,
                kv_memory=4 << 20,
                compile=compiled,
            )
            for s in range(pipeline)
        ]
        self.blocks_each = 40
        self.tables: dict[int, list[int]] = {}

    def table(self, seq: int, shared: list[int] = ()) -> list[int]:
        if seq not in self.tables:
            own = list(range(seq * self.blocks_each, (seq + 1) * self.blocks_each))
            self.tables[seq] = [*shared, *own][: self.blocks_each]
        return self.tables[seq]

    def step(self, work: list[tuple[int, list[int], int, bool]]) -> list[int]:
        """work: (sequence, its new token ids, tokens cached before them, samples?)."""
        seq_lens = [len(ids) for _, ids, _, _ in work]
        context_lens = [c + len(ids) for _, ids, c, _ in work]
        slots = []
        for seq, ids, cached, _ in work:
            table = self.table(seq)
            slots += [
                table[p // BLOCK] * BLOCK + p % BLOCK for p in range(cached, cached + len(ids))
            ]
        width = max(len(self.table(s)) for s, *_ in work)
        tables = torch.full((len(work), width), -1, dtype=torch.int32)
        for i, (seq, *_) in enumerate(work):
            tables[i, : len(self.table(seq))] = torch.tensor(self.table(seq))
        body = {
            "task": "generate",
            "seq_lens": seq_lens,
            "context_lens": context_lens,
            "sample": [[i, 0.0, 0, 1.0, -1, 0] for i, w in enumerate(work) if w[3]],
        }
        x = torch.tensor([t for _, ids, _, _ in work for t in ids])
        tensors = [x, torch.tensor(slots), tables]
        for runner in self.runners:
            out = runner.run(body, tensors)
            tensors = out.tensors
        return out.body["token_ids"]


A = [5, 17, 3, 44, 9, 12, 30, 2, 7, 61, 8]  # 11 tokens: two full blocks and a part
B = [70, 4, 4, 19, 23]
C = A[:8] + [50, 51, 52]  # shares A's two full blocks


@pytest.mark.parametrize(
    "pipeline,compiled", [(1, False), (2, False), (1, True)], ids=["pp1", "pp2", "pp1-compiled"]
)
def test_greedy_matches_transformers(checkpoint, pipeline, compiled):
    out = scenario(Engine(checkpoint, pipeline, compiled=compiled))
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
    assert got[0] == got[1]  # every rank samples the same tokens from the gathered logits
    for seq, prompt in ((0, A), (1, B), (2, C)):
        check_greedy(checkpoint, prompt, got[0][seq])


def rank_main(directory: str, rank: int, port: int, results) -> None:
    torch.set_num_threads(1)
    group = None
    try:
        group = init_tp_group(rank, 2, f"tcp://127.0.0.1:{port}", "cpu", timeout_s=WAIT_S)
        results.put((rank, scenario(Engine(directory, 1, group))))
    except BaseException:
        results.put((rank, traceback.format_exc()))
    finally:
        if group is not None:
            close(group)


def scenario(engine: Engine) -> dict[int, list[int]]:
    """Greedy tokens of A, B and C: A's prompt in two chunks, B joining while A decodes, C
    starting on A's cached blocks while both decode."""
    a, b, c = A, B, C
    out = {0: [], 1: [], 2: []}
    # a's prompt in two chunks; only the second samples
    assert engine.step([(0, a[:6], 0, False)]) == []
    out[0] += engine.step([(0, a[6:], 6, True)])
    # a decodes while b's whole prompt joins the same micro-batch
    got = engine.step([(0, out[0][-1:], len(a), True), (1, b, 0, True)])
    out[0].append(got[0])
    out[1].append(got[1])
    # c starts on a's first two blocks: only its last three prompt tokens are computed
    engine.table(2, shared=engine.table(0)[:2])
    for k in range(6):
        work = [
            (0, out[0][-1:], len(a) + len(out[0]) - 1, True),
            (1, out[1][-1:], len(b) + len(out[1]) - 1, True),
        ]
        if k == 0:
            work.append((2, c[8:], 8, True))
        else:
            work.append((2, out[2][-1:], len(c) + len(out[2]) - 1, True))
        for seq, token in zip((0, 1, 2), engine.step(work), strict=True):
            out[seq].append(token)
    return out


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
