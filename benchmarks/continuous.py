"""continuous: iteration-level batching (sequences join and leave the running batch at every
step) against static batching (no sequence joins until the whole batch has ended), on mixed
output lengths (16 to 256 new tokens), output tokens/s, all 128 jobs handed over at once (as the
peers in DESIGN.md are measured); the same token budget for all, which makes a static batch
about 28 of these prompts. Static batching as transformers' `generate` runs it (`batching.static
= "padded"`: every member computes until the batch's longest ends) is the target's baseline;
the variant where members that end drop out (`"shrinking"`) is reported beside it; the GPT-2 layout of benchmarks/common.gpt2
(8 x 512), tensor 1 x pipeline 1. Also TTFT p99 and TPOT p50 under Poisson arrivals.
`--concurrency N` keeps N jobs in flight instead (closed loop, as at a busy server).
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks import common

BUDGET = "batching.max_batch_tokens=4096"  # a static batch of about 28 of these prompts


def main(argv: Sequence[str] | None = None) -> dict:
    a = common.args(__doc__, argv)
    model = common.gpt2()
    num = 48 if a.quick else 128
    outs = "16:128" if a.quick else "16:256"
    repeats = a.repeats or (1 if a.quick else 3)
    layouts = {
        "continuous": [f"model.path={model}", BUDGET],
        "static": [f"model.path={model}", BUDGET, "batching.static=padded"],
        "static shrinking": [f"model.path={model}", BUDGET, "batching.static=shrinking"],
    }
    return common.compare_generation(
        "continuous",
        "iteration-level vs static batching, mixed output lengths, GPT-2 8 x 512",
        layouts,
        (common.workload(num, "32:256", outs), 0.5),
        [
            ("continuous_vs_static", "continuous", "static", 2.0),
            ("continuous_vs_static_shrinking", "continuous", "static shrinking", None),
        ],
        {
            "model": common.GPT2_MODEL,
            "jobs": num,
            "input_tokens": "32:256",
            "output_tokens": outs,
            "max_batch_tokens": 4096,
        },
        a.quick,
        repeats,
        concurrency=a.concurrency,
    )


if __name__ == "__main__":
    main()
