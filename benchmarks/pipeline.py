"""pipeline: pipeline 2 with several micro-batches in flight, against pipeline 2 with one at a
time (`pipeline.max_inflight = 1`) and against pipeline 1; one torch thread per worker, so
pipeline 2 has two cores to fill and pipeline 1 one. `docstrings`, closed loop. Then the same for
generation (results/pipeline_generation.*): the GPT-2 layout of benchmarks/common.gpt2, pipeline 2
with two groups of sequences in flight against pipeline 1, output tokens/s, and TTFT p99 and TPOT
p50 under Poisson arrivals.
"""

from __future__ import annotations

from collections.abc import Sequence

from baton import bench
from benchmarks import common
from benchmarks.common import Report, Target


def main(argv: Sequence[str] | None = None) -> dict:
    a = common.args(__doc__, argv)
    num = 600 if a.quick else 2400
    repeats = a.repeats or (2 if a.quick else 3)
    jobs = bench.workload("docstrings", num)
    one = ["workers.threads=1"]
    layouts = {
        "pp2 in flight": [*one, "parallel.pipeline=2"],
        "pp2 one at a time": [*one, "parallel.pipeline=2", "pipeline.max_inflight=1"],
        "pp1": [*one, "parallel.pipeline=1"],
    }
    with common.fleets(layouts) as f:
        dist: list[dict] = []
        runs = common.interleave(
            {n: lambda n=n: common.serve(f[n].endpoint, jobs)[0] for n in layouts}, repeats, dist
        )
    inflight = "pp2 in flight"
    report = Report(
        "pipeline",
        "pipeline 2, micro-batches in flight vs one at a time vs pipeline 1 (1 thread/worker)",
        "texts_per_s",
        runs,
        {
            "inflight_vs_pp1": common.paired(runs, inflight, "pp1", "texts_per_s"),
            "inflight_vs_one_at_a_time": common.paired(
                runs, inflight, "pp2 one at a time", "texts_per_s"
            ),
        },
        [
            Target("inflight_vs_pp1", ">=", 1.7),
            Target("inflight_vs_one_at_a_time", ">=", 1.5),
        ],
        {"workload": "docstrings", "num": num, "threads_per_worker": 1, "max_inflight": 4},
        disturbance=dist,
    )
    out = common.write(report, a.quick)
    generation(a.quick, repeats)
    return out


def generation(quick: bool, repeats: int) -> dict:
    model = common.gpt2()
    num = 48 if quick else 128
    outs = "16:128" if quick else "16:256"
    one = [f"model.path={model}", "workers.threads=1"]
    return common.compare_generation(
        "pipeline_generation",
        "generation: pipeline 2 with two groups in flight vs pipeline 1 (1 thread/worker)",
        {"pp2 groups in flight": [*one, "parallel.pipeline=2"], "pp1": one},
        (common.workload(num, "32:256", outs), 0.5),
        [("pp2_vs_pp1", "pp2 groups in flight", "pp1", 1.6)],
        {
            "model": common.GPT2_MODEL,
            "jobs": num,
            "input_tokens": "32:256",
            "output_tokens": outs,
            "threads_per_worker": 1,
        },
        quick,
        repeats,
    )


if __name__ == "__main__":
    main()
