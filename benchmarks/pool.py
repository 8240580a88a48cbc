"""pool: half of every worker's weights in the shared pool (`memory.weight_budget = 0.5`), read in
place (`pooled`) or copied ahead into private buffers (`copied`, `memory.prefetch = "always"`),
against all of them private, side by side: embeddings (MiniLM, `paragraphs`) and generation (the
GPT-2 8 x 512 layout, 128 mixed prompts), plus where each fleet's worker memory is (their own
/proc/PID/smaps_rollup: anonymous, private memory, against the shared memory they map). The
alternatives run in turn, in reverse order every other repeat; every generation fleet has the
same 2.5 GiB KV cache.

Then memory per added replica: GPT-2 fleets of one and of two replicas (`parallel.replicas`),
all private and half pooled. A fleet's cost is its workers' anonymous memory once loaded (weights,
KV cache, runtime), plus their proportional share of shared memory (Pss_Shmem: a page mapped by
two processes counts half in each) after a generation run has touched every weight. What serving
adds to anonymous memory later (activations, kernel caches: 100-200 MB a worker, growing by tens
of MB a run and differing between replicas with the batches each got) is the workload's, not the
weights', and is reported beside as `growth_mb`. What an added replica costs beyond its runtime
(the all-private replica's added cost less its weights) is held against its private weight share
plus prefetch buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from baton import bench
from baton.client import BlockingClient
from benchmarks import common
from benchmarks.common import Figures, Report, Target
from benchmarks.peers import baton_generate, in_turn

LAYOUTS = {
    "private": [],
    "pooled": ["memory.weight_budget=0.5"],
    "copied": ["memory.weight_budget=0.5", 'memory.prefetch="always"'],
}


def memory(endpoint: str) -> Figures:
    """Summed over the fleet's workers: anonymous (private) and shared-memory bytes, MB."""
    with BlockingClient(endpoint, timeout_s=30) as c:
        workers = c.status()["workers"]
    out = {"anonymous_mb": 0.0, "shmem_pss_mb": 0.0, "pooled_weight_mb": 0.0}
    for w in workers:
        for line in Path(f"/proc/{w['pid']}/smaps_rollup").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("Anonymous", "Pss_Shmem"):
                key = "anonymous_mb" if name == "Anonymous" else "shmem_pss_mb"
                out[key] += int(value.split()[0]) / 1024
        out["pooled_weight_mb"] += (w.get("pooled_weight_bytes") or 0) / 2**20
    return out


def replica_memory(make: common.Workload, quick: bool) -> tuple[dict[str, list[Figures]], dict]:
    """Added cost of a second replica, private and pooled (MB), and the ratio of the pooled
    one's (less the runtime's) to its private weight share plus buffers."""
    # a fixed KV cache: sized from free memory (the default), it would differ between fleets
    gpt2 = [f"model.path={common.gpt2()}", "workers.threads=1", "kv.memory=268435456"]
    fleets = {
        f"{n} x{r}": gpt2 + LAYOUTS[n] + [f"parallel.replicas={r}"]
        for n in ("private", "pooled")
        for r in (1, 2)
    }
    jobs = make(0)[0][: 8 if quick else 64]
    cost: dict[str, Figures] = {}
    weights: dict[str, list[dict]] = {}
    with common.fleets(fleets, common.GPT2_CONFIG) as f:
        for name, fleet in f.items():
            loaded = memory(fleet.endpoint)
            baton_generate(fleet.endpoint, jobs, jobs[:2])  # every replica's weights in use
            served = memory(fleet.endpoint)
            cost[name] = {
                "worker_mb": loaded["anonymous_mb"] + served["shmem_pss_mb"],
                "growth_mb": served["anonymous_mb"] - loaded["anonymous_mb"],
            }
            with BlockingClient(fleet.endpoint, timeout_s=30) as c:
                weights[name] = [w for w in c.status()["workers"] if w["replica"] == 0]
    added = {
        n: cost[f"{n} x2"]["worker_mb"] - cost[f"{n} x1"]["worker_mb"]
        for n in ("private", "pooled")
    }
    total = sum(w["resident_weight_bytes"] for w in weights["private x1"]) / 2**20
    share = sum(w["resident_weight_bytes"] for w in weights["pooled x1"]) / 2**20
    runtime = added["private"] - total
    runs = {f"replicas: {k}": [v] for k, v in cost.items()}
    figures = {
        "added_private_mb": added["private"],
        "added_pooled_mb": added["pooled"],
        "weights_mb": total,
        "private_share_mb": share,
        "runtime_mb": runtime,
        "ratio": (added["pooled"] - runtime) / share,
    }
    return runs, figures


def main(argv: Sequence[str] | None = None) -> dict:
    a = common.args(__doc__, argv)
    repeats = a.repeats or (1 if a.quick else 3)
    texts = bench.workload("paragraphs", 200 if a.quick else 1298)
    make = common.workload(16 if a.quick else 128, "32:256", "16:64" if a.quick else "16:256")
    dist: list[dict] = []
    runs: dict[str, list[Figures]] = {}
    setup: dict[str, Any] = {"budget": 0.5, "embeddings": "paragraphs", "generation": "gpt2 8x512"}
    with common.fleets(LAYOUTS) as f:
        for n in LAYOUTS:  # warmed up, untimed
            common.serve(f[n].endpoint, texts[:32])

        def embed(n: str) -> Figures:
            figures, _ = common.serve(f[n].endpoint, texts)
            return {"per_s": figures["texts_per_s"], **memory(f[n].endpoint)}

        runs |= {
            f"embeddings: {k}": v
            for k, v in common.interleave(
                {n: lambda n=n: embed(n) for n in LAYOUTS}, repeats, dist, alternate=True
            ).items()
        }
    # every fleet the same KV cache (room for all 128 sequences at their longest, 2.1 GB): sized
    # from free memory, the first fleet started would get the most
    gpt2 = [f"model.path={common.gpt2()}", f"kv.memory={5 << 29}"]
    with common.fleets({n: gpt2 + s for n, s in LAYOUTS.items()}, common.GPT2_CONFIG) as f:
        draws = [make(r)[0] for r in range(repeats * common.ATTEMPTS)]
        warm = make(repeats * common.ATTEMPTS)[0][:4]

        def generate(n: str, d: int) -> Figures:
            figures = baton_generate(f[n].endpoint, draws[d], warm)
            return {"per_s": figures["output_tokens_per_s"], **memory(f[n].endpoint)}

        alternatives = {n: in_turn(lambda d, n=n: generate(n, d), len(draws)) for n in LAYOUTS}
        runs |= {
            f"generation: {k}": v
            for k, v in common.interleave(alternatives, repeats, dist, alternate=True).items()
        }
    ratios = {
        f"{w}_{n}_vs_private": common.paired(runs, f"{w}: {n}", f"{w}: private", "per_s")
        for w in ("embeddings", "generation")
        for n in ("pooled", "copied")
    }
    replicas, setup["replica_memory"] = replica_memory(make, a.quick)
    runs |= replicas
    ratios["added_replica_vs_private_share"] = [setup["replica_memory"]["ratio"]]
    report = Report(
        "pool",
        "half the weights pooled, in place, vs all private (per_s: texts/s, output tokens/s)",
        "per_s",
        runs,
        ratios,
        [
            Target(f"{w}_{n}_vs_private", ">=", bound)
            for w in ("embeddings", "generation")
            for n, bound in (("pooled", 0.95), ("copied", 0.8))
        ]
        # an added replica's weights cost at most its private share (5 %: allocator slack)
        + [Target("added_replica_vs_private_share", "<=", 1.05)],
        setup,
        disturbance=dist,
    )
    return common.write(report, a.quick)


if __name__ == "__main__":
    main()
