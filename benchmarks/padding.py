"""padding: padding-free against padded execution (`batching.padding_free`), same fleet layout,
`docstrings` in arrival order.

Padded pads each micro-batch to its longest sequence, as a framework without packing would. The
controller counts, for the batches it formed, real tokens and what padding would have cost, so
`padding_limit` (padded ÷ real tokens) is the most removing padding can buy on these batches.
"""

from __future__ import annotations

from collections.abc import Sequence

from baton import bench
from benchmarks import common
from benchmarks.common import Figures, Report, Target


def main(argv: Sequence[str] | None = None) -> dict:
    a = common.args(__doc__, argv)
    num = 300 if a.quick else 1000
    repeats = a.repeats or (2 if a.quick else 3)
    jobs = bench.workload("docstrings", num)
    layouts = {"packed": [], "padded": ["batching.padding_free=false"]}
    with common.fleets(layouts) as f:

        def one(name: str) -> Figures:
            figures, stats = common.serve(f[name].endpoint, jobs)
            figures["batches"] = stats["batches"]
            figures["texts_per_batch"] = num / max(1, stats["batches"])
            figures["padded_per_real"] = stats["padded_tokens"] / max(1, stats["tokens"])
            return figures

        dist: list[dict] = []
        runs = common.interleave({n: lambda n=n: one(n) for n in layouts}, repeats, dist)
    report = Report(
        "padding",
        "padding-free (packed) vs padded to each batch's longest",
        "texts_per_s",
        runs,
        {
            "packed_vs_padded": common.paired(runs, "packed", "padded", "texts_per_s"),
            # measured on the batches the padded fleet actually ran
            "padding_limit": [r["padded_per_real"] for r in runs["padded"]],
        },
        [Target("packed_vs_padded", ">=", "padding_limit", 0.7)],
        {"workload": "docstrings (arrival order)", "num": num, "max_batch_tokens": 4096},
        disturbance=dist,
    )
    return common.write(report, a.quick)


if __name__ == "__main__":
    main()
