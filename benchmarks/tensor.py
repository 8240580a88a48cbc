"""tensor: latency of one large batch (docstrings up to the 4096-token budget, sent at once to an
idle fleet) at tensor 1 against tensor 2, one torch thread per worker: tensor 2 splits every
layer's heads and MLP width over two cores and all-reduces twice a layer, through shared memory
(`tp2`) or gloo (`tp2_gloo`, `parallel.shared_reduce = false`).
"""

from __future__ import annotations

from collections.abc import Sequence

from baton import bench
from baton.client import BlockingClient
from benchmarks import common
from benchmarks.common import Figures, Report, Target
from workers.models import load_info
from workers.tokenizer import Tokenizer

BUDGET = 4096


def main(argv: Sequence[str] | None = None) -> dict:
    a = common.args(__doc__, argv)
    repeats = a.repeats or (5 if a.quick else 15)
    jobs = batch(bench.workload("docstrings", 400), BUDGET)
    tp2 = ["workers.threads=1", "parallel.tensor=2"]
    layouts = {
        "tp1": ["workers.threads=1"],
        "tp2": tp2,  # all-reduces through shared memory
        "tp2_gloo": [*tp2, "parallel.shared_reduce=false"],
    }
    with common.fleets(layouts) as f:
        for fleet in f.values():  # warm-up: one batch of the same shape
            bench.run(fleet.endpoint, jobs, bench.Load(), progress=False)

        def one(name: str) -> Figures:
            ep = f[name].endpoint
            with BlockingClient(ep) as c:
                before = c.status()["controllers"][0]["stats"]["batches"]
            m = bench.run(ep, jobs, bench.Load(), progress=False)  # all at once
            with BlockingClient(ep) as c:
                batches = c.status()["controllers"][0]["stats"]["batches"] - before
            if m["completed"] != len(jobs):
                raise RuntimeError(f"{m['completed']} of {len(jobs)} completed: {m['errors']}")
            return {
                "latency_ms": m["duration"] * 1000,
                "tokens": m["total_input_tokens"],
                "batches": batches,
            }

        dist: list[dict] = []
        runs = common.interleave({n: lambda n=n: one(n) for n in layouts}, repeats, dist)
    report = Report(
        "tensor",
        "latency of one large batch, tensor 1 vs tensor 2 (1 thread/worker)",
        "latency_ms",
        runs,
        {
            "tp2_vs_tp1_latency": common.paired(runs, "tp2", "tp1", "latency_ms"),
            "tp2_gloo_vs_tp1_latency": common.paired(runs, "tp2_gloo", "tp1", "latency_ms"),
        },
        [Target("tp2_vs_tp1_latency", "<=", 0.65)],
        {"workload": "docstrings", "texts": len(jobs), "threads_per_worker": 1},
        disturbance=dist,
    )
    return common.write(report, a.quick)


def batch(jobs: list[dict], budget: int) -> list[dict]:
    """The first jobs whose tokens (after truncation) fit `budget`: one scheduler batch."""
    tok = Tokenizer(load_info(common.MODEL))
    out, used = [], 0
    for job, e in zip(jobs, tok.encode([j["text"] for j in jobs]), strict=True):
        if used + len(e.ids) > budget:
            break
        out.append(job)
        used += len(e.ids)
    return out


if __name__ == "__main__":
    main()
