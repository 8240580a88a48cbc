"""continuous: iteration-level batching (sequences join and leave the running batch at every
step) against static batching (`batching.static = true`: no sequence joins until the whole batch
has ended), on mixed output lengths (16 to 256 new tokens), output tokens/s; the GPT-2 layout of
benchmarks/common.gpt2 (8 x 512), tensor 1 x pipeline 1, the same token budget for both. Also
TTFT p99 and TPOT p50 under Poisson arrivals.
"""

from __future__ import annotations

from collections.abc import Sequence

from baton import bench
from benchmarks import common
from benchmarks.common import Report, Target

BUDGET = "batching.max_batch_tokens=4096"  # a static batch of about 28 of these prompts


def main(argv: Sequence[str] | None = None) -> dict:
    a = common.args(__doc__, argv)
    model = common.gpt2()
    num = 48 if a.quick else 128
    outs = "16:128" if a.quick else "16:256"
    repeats = a.repeats or (1 if a.quick else 3)
    jobs = bench.generation(num, "32:256", outs, tokenizer=model, seed=0)
    poisson = bench.generation(num // 2, "32:256", outs, tokenizer=model, seed=1)
    rate = 0.5
    layouts = {
        "continuous": [f"model.path={model}", BUDGET],
        "static": [f"model.path={model}", BUDGET, "batching.static=true"],
    }
    with common.fleets(layouts, common.GPT2_CONFIG) as f:
        dist: list[dict] = []
        runs = common.interleave(
            {n: lambda n=n: common.generate(f[n].endpoint, jobs, poisson, rate) for n in layouts},
            repeats,
            dist,
            alternate=True,
        )
    report = Report(
        "continuous",
        "iteration-level vs static batching, mixed output lengths, GPT-2 8 x 512",
        "output_tokens_per_s",
        runs,
        {
            "continuous_vs_static": common.paired(
                runs, "continuous", "static", "output_tokens_per_s"
            )
        },
        [Target("continuous_vs_static", ">=", 2.0)],
        {
            "model": "GPT-2 layout 8 x 512, vocabulary 50257, random weights",
            "jobs": num,
            "input_tokens": "32:256",
            "output_tokens": outs,
            "max_batch_tokens": 4096,
            "poisson_rate_jobs_per_s": rate,
        },
        disturbance=dist,
    )
    return common.write(report, a.quick)


if __name__ == "__main__":
    main()
