"""generation: the fleet (tensor 1 x pipeline 1: broker, journal, controller, one worker)
against transformers' `generate` in padded static batches of 32, on the same prompts (32 to 256
tokens of stdlib text) with 16 to 256 new tokens each, greedy, output tokens/s; the GPT-2 layout
of benchmarks/common.gpt2 (8 x 512, random weights). Also the fleet's TTFT p99 and TPOT p50
under Poisson arrivals.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from benchmarks import common
from benchmarks.common import Figures, Report, Target

BATCH = 32  # transformers' static batch


def transformers_generate(model_dir, jobs: list[dict]) -> Figures:
    """Left-padded batches of BATCH in arrival order, each run until its longest member ends
    (what `generate` does); only the tokens each job asked for count."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.generation_config.eos_token_id = None  # as ignore_eos: every job makes its tokens
    pad = 0
    t0 = time.perf_counter()
    made = 0
    with torch.inference_mode():
        for k in range(0, len(jobs), BATCH):
            batch = jobs[k : k + BATCH]
            width = max(len(j["token_ids"]) for j in batch)
            ids = torch.tensor(
                [[pad] * (width - len(j["token_ids"])) + j["token_ids"] for j in batch]
            )
            mask = torch.tensor(
                [[0] * (width - len(j["token_ids"])) + [1] * len(j["token_ids"]) for j in batch]
            )
            longest = max(j["max_new_tokens"] for j in batch)
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=longest,
                do_sample=False,
                pad_token_id=pad,
            )
            made += sum(j["max_new_tokens"] for j in batch)
    seconds = time.perf_counter() - t0
    return {"output_tokens_per_s": made / seconds, "seconds": seconds}


def main(argv: Sequence[str] | None = None) -> dict:
    a = common.args(__doc__, argv)
    model = common.gpt2()
    num = 32 if a.quick else 128
    outs = "16:64" if a.quick else "16:256"
    repeats = a.repeats or (1 if a.quick else 3)
    make = common.workload(num, "32:256", outs)
    fleet, peer = common.fresh(make), common.fresh(make)  # the same prompts, new each repeat
    rate = 0.5 if a.quick else 0.5
    torch.set_num_threads(2)  # as the fleet's one worker on this 2-core machine
    with common.fleets({"fleet": [f"model.path={model}"]}, common.GPT2_CONFIG) as f:
        dist: list[dict] = []
        runs = common.interleave(
            {
                "fleet tp1 pp1": lambda: common.generate(f["fleet"].endpoint, *fleet(), rate),
                "transformers generate": lambda: transformers_generate(model, peer()[0]),
            },
            repeats,
            dist,
        )
    report = Report(
        "generation",
        "the fleet vs transformers generate (static batches of 32), GPT-2 8 x 512",
        "output_tokens_per_s",
        runs,
        {
            "fleet_vs_transformers": common.paired(
                runs, "fleet tp1 pp1", "transformers generate", "output_tokens_per_s"
            )
        },
        [Target("fleet_vs_transformers", ">=", 2.0)],
        {
            "model": common.GPT2_MODEL,
            "jobs": num,
            "input_tokens": "32:256",
            "output_tokens": outs,
            "greedy": True,
            "poisson_rate_jobs_per_s": rate,
            "transformers_batch": BATCH,
        },
        disturbance=dist,
    )
    return common.write(report, a.quick)


if __name__ == "__main__":
    main()
