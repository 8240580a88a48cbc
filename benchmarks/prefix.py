"""prefix: 300 jobs sharing a 384-token prefix, each with its own short suffix (8 to 32 tokens),
32 new tokens each, with prefix sharing (`kv.prefix_sharing = true`: the prefix's full blocks
are computed once and shared) and without, output tokens/s; the GPT-2 layout of
benchmarks/common.gpt2 (8 x 512), tensor 1 x pipeline 1. Also TTFT p99 and TPOT p50 under
Poisson arrivals.
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks import common


def main(argv: Sequence[str] | None = None) -> dict:
    a = common.args(__doc__, argv)
    model = common.gpt2()
    num = 60 if a.quick else 300
    repeats = a.repeats or (1 if a.quick else 3)
    # each job's own text sits on top of the shared 384 tokens
    layouts = {
        "sharing": [f"model.path={model}"],
        "no sharing": [f"model.path={model}", "kv.prefix_sharing=false"],
    }
    return common.compare_generation(
        "prefix",
        "300 jobs sharing a 384-token prefix, with and without prefix sharing, GPT-2 8 x 512",
        layouts,
        (common.workload(num, "8:32", "32", prefix_len=384), 2.0),
        [("sharing_vs_none", "sharing", "no sharing", 3.0)],
        {
            "model": common.GPT2_MODEL,
            "jobs": num,
            "prefix_tokens": 384,
            "suffix_tokens": "8:32",
            "output_tokens": 32,
        },
        a.quick,
        repeats,
    )


if __name__ == "__main__":
    main()
