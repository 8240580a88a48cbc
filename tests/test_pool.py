"""The peer memory pool: the plan keeps each rank to its budget; pooled weights are read in place
from one shared region with bitwise the outputs of private ones, for the encoder and a decoder;
the processes' own memory maps show where the bytes are; a fleet with half its weights pooled
serves, reports its memory, survives a worker's SIGKILL and removes its pool when it stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from corpus import MODEL, texts
from decoders import gpt2

from workers import packing
from workers.layers import native
from workers.layers.linear import Packed
from workers.layers.parallel import TPGroup
from workers.models import load_info
from workers.pool import ALIGN, FILLED, FLAGS, PACKED, Pooled, PoolError, Region, layout, unit_names
from workers.prefetch import LOWEST
from workers.runner import ModelRunner
from workers.tokenizer import Tokenizer

SOLO = TPGroup(0, 1, None)
BUDGETS = [1.0, 0.5, 0.2]


@pytest.fixture(scope="module")
def info():
    return load_info(MODEL)


@pytest.fixture
def shm():
    """A fresh path in the host's shared memory, removed after."""
    path = Path("/dev/shm") / f"baton-test-{uuid.uuid4().hex}.pool"
    yield path
    path.unlink(missing_ok=True)


def test_the_plan_keeps_each_rank_to_its_budget(info):
    for tensor, pipeline in ((1, 1), (2, 2)):
        for budget in BUDGETS:
            plan = layout(info, tensor, pipeline, "float32", None, budget)
            for key, private in plan.private.items():
                total = private + plan.pooled[key]
                assert private <= budget * total
                assert sum(e.nbytes for e in plan.of(*key)) == plan.pooled[key]
            places = sorted((e.offset, e.nbytes) for es in plan.entries.values() for e in es)
            for (a, n), (b, _) in zip(places, places[1:], strict=False):
                assert a % ALIGN == 0 and a + n <= b  # page-aligned, no two overlap
            assert all(a >= FLAGS for a, _ in places)  # clear of the shards' "filled" flags
            assert plan.size >= sum(n for _, n in places)
            if budget == 1.0:
                assert plan.size == 0 and not any(plan.entries.values())


def test_a_screened_heads_int8_copy_counts_against_the_budget(tmp_path):
    """A private LM head that is screened keeps an int8 copy beside its weight: the plan counts
    it, so what a decoder's worker keeps privately, copy included, stays within the budget."""
    decoder = load_info(str(gpt2(tmp_path)))
    words, dim = decoder.vocab_size, decoder.hidden_size
    copy = words * dim + 20 * words  # a byte a value; scale, zero point, radius, size a word
    for budget in (0.7, 0.5, 0.3):
        plain = layout(decoder, 1, 1, "float32", None, budget)
        screened = layout(decoder, 1, 1, "float32", None, budget, screen=True)
        weights = plain.private[0, 0] + plain.pooled[0, 0]
        head_private = "lm_head" not in unit_names(screened.of(0, 0))
        assert screened.private[0, 0] + screened.pooled[0, 0] == weights + copy * head_private
        assert screened.private[0, 0] <= budget * weights
        assert screened.pooled[0, 0] >= plain.pooled[0, 0]  # room made for the copy
    # the default budget pools nothing, the copy kept beside the head
    assert layout(decoder, 1, 1, "float32", None, 1.0, screen=True).size == 0


def test_the_embedding_table_goes_first_then_alternate_layers(info):
    def units(budget: float) -> list[str]:
        return unit_names(layout(info, 1, 1, "float32", None, budget).of(0, 0))  # as in status

    assert units(0.85) == ["embeddings"]  # read a few rows a token: as cheap from the pool
    # then the second, fourth and sixth layers: each keeps a resident neighbour
    assert units(0.3) == ["embeddings", "layers.1", "layers.3", "layers.5"]


def test_on_a_gpu_only_layers_are_pooled_and_a_budget_below_the_rest_is_refused(info):
    plan = layout(info, 1, 1, "float32", None, 0.8, device="cuda")
    assert unit_names(plan.of(0, 0)) == ["layers.1", "layers.3", "layers.5"]  # alternate ones
    assert plan.private[0, 0] <= 0.8 * (plan.private[0, 0] + plan.pooled[0, 0])
    # MiniLM's embedding table is over half of it: at 0.5 it would have to leave the GPU
    with pytest.raises(PoolError, match=r"the budget must be at least \d+ bytes"):
        layout(info, 1, 1, "float32", None, 0.5, device="cuda")


def test_a_tiny_budget_pools_everything_and_too_little_shared_memory_is_refused(info, shm):
    plan = layout(info, 1, 1, "float32", None, 1000)  # bytes: less than any unit
    assert plan.private[(0, 0)] == 0 and plan.pooled[(0, 0)] > 0
    with pytest.raises(PoolError, match=rf"the pool needs {1 << 50} bytes of shared memory"):
        Region.create(shm, 1 << 50)
    assert not shm.exists()


def in_region(t: torch.Tensor, region: Region) -> bool:
    start = torch.frombuffer(region.map, dtype=torch.uint8, count=1).data_ptr()
    return start <= t.data_ptr() < start + len(region.map)


@pytest.mark.parametrize("prefetch", ["auto", "always"], ids=["in place", "copied ahead"])
@pytest.mark.parametrize("budget", BUDGETS[1:])
def test_encoder_outputs_are_bitwise_the_same_with_the_pool(info, shm, budget, prefetch):
    seqs = [e.ids for e in Tokenizer(info).encode(texts(24))]
    x, seq_lens = packing.pack(seqs)
    plan = layout(info, 1, 1, "float32", None, budget)
    region = Region.create(shm, plan.size)
    private = ModelRunner(info, 0, 1, SOLO)
    pooled = ModelRunner(info, 0, 1, SOLO, pooled=Pooled.of(region, plan, 0, 0), prefetch=prefetch)
    body = {"task": "embed", "seq_lens": seq_lens}
    want = private.run(body, [x]).tensors[0]
    for _ in range(2):  # the copies go around: the second forward's come from the first's turn
        assert torch.equal(pooled.run(body, [x]).tensors[0], want)
    weights = [p for _, p in pooled.model.named_parameters() if getattr(p, "pooled", False)]
    assert weights and plan.pooled[(0, 0)] > 0
    # the pooled layers' matrices lie in the pool in oneDNN's layout, read through views
    linears = [m for m in pooled.model.modules() if isinstance(m, Packed) and m.weight is not None]
    assert all(m.in_pool == bool(native.kernels()) and m.plain != m.in_pool for m in linears)
    # between forwards every pooled weight is back on the region (in place: it never left)
    assert all(in_region(p, region) for p in weights)
    layers = sum(1 for e in plan.of(0, 0) if e.param.endswith("qkv.weight"))
    if prefetch == "always" and layers:
        p = pooled.prefetcher
        assert p is not None and p.prefetches >= 2 * layers
        assert pooled.counters() == {"prefetches": p.prefetches, "stalls": p.stalls}
        # the copier yields the cores to the matmuls
        assert os.getpriority(os.PRIO_PROCESS, p.copier.native_id) == LOWEST
    else:
        assert pooled.prefetcher is None and pooled.counters() == {}


def test_a_filled_shard_is_not_written_again(info, shm):
    """A second worker of the same (stage, rank) (another replica's, or a restart's) reads only
    its private weights: the pooled bytes another process computes with are never rewritten."""
    x, seq_lens = packing.pack([e.ids for e in Tokenizer(info).encode(texts(4))])
    body = {"task": "embed", "seq_lens": seq_lens}
    plan = layout(info, 1, 1, "float32", None, 0.5)
    region = Region.create(shm, plan.size)
    first = ModelRunner(info, 0, 1, SOLO, pooled=Pooled.of(region, plan, 0, 0))
    assert region.map[plan.flags[0, 0]] == (PACKED if native.kernels() else FILLED)
    want = first.run(body, [x]).tensors[0]
    entry = plan.of(0, 0)[0]
    mark = bytes(region.map[entry.offset : entry.offset + 8])
    region.map[entry.offset : entry.offset + 8] = b"\x7f" * 8  # a byte the loader would mend
    second = ModelRunner(info, 0, 1, SOLO, pooled=Pooled.of(region, plan, 0, 0))
    assert region.map[entry.offset : entry.offset + 8] == b"\x7f" * 8
    region.map[entry.offset : entry.offset + 8] = mark
    assert torch.equal(second.run(body, [x]).tensors[0], want)


HOLD = """
import sys
from pathlib import Path
from workers.pool import Region
region = Region.open(Path(sys.argv[1]), int(sys.argv[2]))
with region.locked(int(sys.argv[3])):
    print("locked", flush=True)
    sys.stdin.read()  # killed here, mid-fill
"""


def test_a_worker_killed_while_filling_leaves_the_shard_to_its_successor(info, shm):
    plan = layout(info, 1, 1, "float32", None, 0.5)
    region = Region.create(shm, plan.size)
    pooled = Pooled.of(region, plan, 0, 0)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(shm), str(plan.size), str(pooled.flag)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder.kill()
        holder.wait(timeout=30)
        with pooled.filling() as empty:  # the kernel dropped the dead holder's lock
            assert empty
        with pooled.filling() as empty:
            assert not empty
    finally:
        holder.kill()
        holder.wait(timeout=30)


def generate(runners: list[ModelRunner], prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens of one sequence through `runners` (the stages), its KV in blocks 0.. ."""
    out, ids, cached = [], list(prompt), 0
    for _ in range(steps):
        n = len(ids)
        body = {
            "task": "generate",
            "seq_lens": [n],
            "context_lens": [cached + n],
            "sample": [[0, 0.0, 0, 1.0, -1, 0]],
        }
        table = torch.arange(16, dtype=torch.int32)[None]
        tensors = [torch.tensor(ids), torch.arange(cached, cached + n), table]
        for r in runners:
            step = r.run(body, tensors)
            tensors = step.tensors
        token = step.body["token_ids"][0]
        out.append(token)
        cached, ids = cached + n, [token]
    return out


@pytest.mark.parametrize("prefetch", ["auto", "always"], ids=["in place", "copied ahead"])
@pytest.mark.parametrize("budget", BUDGETS[1:])
def test_decoder_tokens_and_hidden_states_are_the_same_with_the_pool(
    tmp_path, shm, budget, prefetch
):
    info = load_info(str(gpt2(tmp_path)))
    plan = layout(info, 1, 2, "float32", None, budget)
    region = Region.create(shm, plan.size)

    def runners(pool: bool) -> list[ModelRunner]:
        return [
            ModelRunner(
                info,
                s,
                2,
                SOLO,
                block_size=4,
                kv_memory=1 << 20,
                pooled=Pooled.of(region, plan, s, 0) if pool else None,
                prefetch=prefetch,
            )
            for s in range(2)
        ]

    private, pooled = runners(False), runners(True)
    prompt = [5, 17, 3, 44, 9, 12, 30]
    assert generate(pooled, prompt, 12) == generate(private, prompt, 12)
    body = {"task": "generate", "seq_lens": [7], "context_lens": [7], "sample": []}
    tensors = [torch.tensor(prompt), torch.arange(7), torch.arange(16, dtype=torch.int32)[None]]
    hidden = [r[0].run(body, tensors).tensors[0] for r in (private, pooled)]
    assert torch.equal(*hidden)
    assert sum(plan.pooled.values()) > 0


MEMORY = """
import json, sys, torch
from pathlib import Path
from workers.layers.parallel import TPGroup
from workers.main import release_freed_memory
from workers.models import build, load_info
from workers.pool import Pooled, Region, layout
info = load_info(sys.argv[1])
budget, path = float(sys.argv[2]), Path(sys.argv[3])
plan = layout(info, 1, 1, "float32", None, budget)
pooled = Pooled.of(Region.create(path, plan.size), plan, 0, 0) if plan.size else None
model = build(info, 0, 1, TPGroup(0, 1, None), pooled=pooled)
release_freed_memory()
fields = {}
for line in open("/proc/self/smaps_rollup"):
    name, _, value = line.partition(":")
    if value.strip().endswith("kB"):
        fields[name] = int(value.split()[0]) * 1024
print(json.dumps({"smaps": fields, "pooled": plan.pooled[(0, 0)]}))
"""


def memory(budget: float, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY, MODEL, str(budget), str(path)],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    return json.loads(out.stdout.splitlines()[-1])


def test_pooled_bytes_leave_private_memory_for_the_shared_region(shm):
    """From the process's own /proc/self/smaps_rollup: at half the budget, about the pooled
    bytes move out of its anonymous (private) memory and into shared memory it maps."""
    whole = memory(1.0, shm)
    half = memory(0.5, shm)
    pooled = half["pooled"]
    assert pooled > 20 << 20
    moved = whole["smaps"]["Anonymous"] - half["smaps"]["Anonymous"]
    assert moved >= 0.8 * pooled, (moved, pooled)
    assert half["smaps"]["Pss_Shmem"] >= 0.95 * pooled
    assert whole["smaps"]["Pss_Shmem"] < 0.05 * pooled


def one_by_one(endpoint: str, chosen: list[str]) -> torch.Tensor:
    """Each text alone (a batch of its own: the same batches whatever the fleet), in order."""
    from baton.client import BlockingClient

    with BlockingClient(endpoint, timeout_s=120) as c:
        rows = [c.embed([t])[0] for t in chosen]
    assert all(r.status == "ok" for r in rows), [r.error for r in rows]
    return torch.tensor([r.embedding for r in rows])


def status(endpoint: str) -> dict:
    from baton.client import BlockingClient

    with BlockingClient(endpoint, timeout_s=30) as c:
        return c.status()


def test_a_fleet_with_half_its_weights_pooled(tmp_path):
    """tensor 2 x pipeline 2 at half the budget, in place and copied ahead: bitwise the
    embeddings of the same fleet without the pool, its memory in `baton status` and in each
    worker's smaps, the same after a worker's SIGKILL, and no pool left once it stops."""
    from conftest import start

    chosen = [t for t in texts(12, seed=5) if t.strip()][:8]
    layout_sets = ["parallel.tensor=2", "parallel.pipeline=2", "workers.dead_after_ms=5000"]
    plain = start(*layout_sets)
    try:
        want = one_by_one(plain.endpoint, chosen)
    finally:
        plain.stop()
    resident = {}
    for prefetch in ("auto", "always"):
        fleet = start(*layout_sets, "memory.weight_budget=0.5", f'memory.prefetch="{prefetch}"')
        try:
            assert torch.equal(one_by_one(fleet.endpoint, chosen), want)
            s = status(fleet.endpoint)
            assert s["pool_bytes"] >= sum(w["pooled_weight_bytes"] for w in s["workers"]) > 0
            pools = set()
            for w in s["workers"]:
                pooled = w["pooled_weight_bytes"]
                assert pooled > 0
                maps = Path(f"/proc/{w['pid']}/maps").read_text().splitlines()
                pools |= {line.split()[-1] for line in maps if line.endswith(".pool")}
                rollup = Path(f"/proc/{w['pid']}/smaps_rollup").read_text().splitlines()
                shmem = next(int(x.split()[1]) * 1024 for x in rollup if x.startswith("Pss_Shmem:"))
                assert shmem >= 0.95 * pooled, (w["rank"], shmem, pooled)
            assert all(w["pooled_units"] for w in s["workers"])  # which, for `baton status`
            resident[prefetch] = [w["resident_weight_bytes"] for w in s["workers"]]
            [pool] = pools  # one region, mapped by every worker
            assert Path(pool).exists()
            victim = s["workers"][-1]
            os.kill(victim["pid"], signal.SIGKILL)
            assert torch.equal(one_by_one(fleet.endpoint, chosen), want)
            after = status(fleet.endpoint)["workers"][-1]
            assert after["restarts"] == 1
            assert after["pooled_weight_bytes"] == victim["pooled_weight_bytes"]
        finally:
            fleet.stop()
        assert not Path(pool).exists()
    # in place, a worker keeps half its shard or less; copying ahead adds its buffers (a worker
    # with pooled layers has some)
    for auto, w in zip(resident["auto"], s["workers"], strict=True):
        assert auto <= 0.5 * (auto + w["pooled_weight_bytes"])
    pairs = list(zip(resident["auto"], resident["always"], strict=True))
    assert all(always >= auto for auto, always in pairs)
    assert any(always > auto for auto, always in pairs)


def pool_map(pid: int) -> dict[str, int]:
    """Rss and Pss of the process's mapping of the pool, in bytes, from its own smaps."""
    out = {"Rss": 0, "Pss": 0}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and ":" not in head[0]:  # a mapping's first line: range perms ...
            inside = line.endswith(".pool")
        elif inside and head[0].rstrip(":") in out:
            out[head[0].rstrip(":")] += int(head[1]) * 1024
    return out


def test_two_replicas_map_one_pool(tmp_path):
    """parallel.replicas = 2 at a fifth of the budget: both replicas serve (the broker takes
    turns), both workers map the one region, and their proportional shares of it add up to the
    pool once, not twice."""
    from conftest import start

    chosen = [t for t in texts(12, seed=7) if t.strip()][:8]
    fleet = start("parallel.replicas=2", "memory.weight_budget=0.2")
    try:
        got = one_by_one(fleet.endpoint, chosen)
        s = status(fleet.endpoint)
        assert sorted(c["replica"] for c in s["controllers"]) == [0, 1]
        assert sorted(w["replica"] for w in s["workers"]) == [0, 1]
        pool = s["pool_bytes"]
        assert pool > 0 and all(w["pooled_weight_bytes"] > 0 for w in s["workers"])
        figures = [pool_map(w["pid"]) for w in s["workers"]]
        # each maps what it touched of the region (both computed: turns); shared pages are
        # split between them, so the proportional sizes add up to the region's resident bytes
        assert all(f["Rss"] > 0.25 * pool for f in figures), (figures, pool)
        assert sum(f["Rss"] for f in figures) > 1.2 * pool, (figures, pool)
        assert 0.9 * pool <= sum(f["Pss"] for f in figures) <= pool, (figures, pool)
    finally:
        fleet.stop()
    reference = start()
    try:
        assert torch.equal(one_by_one(reference.endpoint, chosen), got)
    finally:
        reference.stop()
