"""efficiency: the fleet (tensor 1, pipeline 1) against the same model code in a tight
single-process loop and against sentence-transformers `encode(batch_size=32)`, on `docstrings`.

All three tokenize inside the timed region (the fleet's controller does), truncate at 256 tokens
and use both cores (the fleet's one worker gets cores ÷ workers = 2 torch threads). The loop forms
batches exactly as the scheduler does under a full queue: FIFO, up to 4096 real tokens.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never try the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from baton import bench  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.common import MODEL, Figures, Report, Target  # noqa: E402

BUDGET = 4096  # batching.max_batch_tokens, the default


def main(argv: Sequence[str] | None = None) -> dict:
    a = common.args(__doc__, argv)
    num = 300 if a.quick else 1500
    repeats = a.repeats or (2 if a.quick else 3)
    jobs = bench.workload("docstrings", num)
    texts = [j["text"] for j in jobs]
    loop = Loop()
    st = sentence_transformer()
    with common.fleets({"fleet": []}) as f:
        endpoint = f["fleet"].endpoint

        def fleet() -> Figures:
            figures, _ = common.serve(endpoint, jobs)
            del figures["median_e2el_ms"]  # the other two have no per-job latency
            return figures

        tokens = loop.count(texts)  # after truncation, as the fleet counts them
        loop.run(texts[:32])  # warm-up, as the fleet's
        st.encode(texts[:32], batch_size=32)
        dist: list[dict] = []
        runs = common.interleave(
            {
                "fleet": fleet,
                "tight loop": lambda: timed(lambda: loop.run(texts), num, tokens),
                "sentence-transformers": lambda: timed(
                    lambda: st.encode(texts, batch_size=32), num, tokens
                ),
            },
            repeats,
            dist,
        )
    report = Report(
        "efficiency",
        "fleet (tensor 1, pipeline 1) vs the same model in one process vs sentence-transformers",
        "texts_per_s",
        runs,
        {
            "fleet_vs_loop": common.paired(runs, "fleet", "tight loop", "texts_per_s"),
            "fleet_vs_sentence_transformers": common.paired(
                runs, "fleet", "sentence-transformers", "texts_per_s"
            ),
        },
        [
            Target("fleet_vs_loop", ">=", 0.90),
            Target("fleet_vs_sentence_transformers", ">=", 1.0),
        ],
        {"workload": "docstrings", "num": num, "threads": torch.get_num_threads()},
        disturbance=dist,
    )
    return common.write(report, a.quick)


class Loop:
    """The fleet's model code with nothing around it: tokenize, batch, pack, forward."""

    def __init__(self) -> None:
        from workers.layers.parallel import TPGroup
        from workers.models import build, load_info
        from workers.tokenizer import Tokenizer

        info = load_info(MODEL)
        self.tokenizer = Tokenizer(info)
        self.model = build(info, 0, 1, TPGroup(0, 1, None))

    def run(self, texts: list[str]) -> None:
        from workers.layers.attention import Context
        from workers.packing import pack

        seqs = [e.ids for e in self.tokenizer.encode(texts)]
        with torch.inference_mode():
            for batch in batches(seqs, BUDGET):
                ids, seq_lens = pack(batch)
                self.model(ids, Context.encoder(seq_lens, False, ids.device))

    def count(self, texts: list[str]) -> int:
        """Tokens of `texts` as the fleet counts them (after truncation); not timed work."""
        return sum(len(e.ids) for e in self.tokenizer.encode(texts))


def batches(seqs: list[list[int]], budget: int) -> list[list[list[int]]]:
    """FIFO runs of at most `budget` tokens (at least one sequence each), as the scheduler."""
    out: list[list[list[int]]] = [[]]
    used = 0
    for s in seqs:
        if out[-1] and used + len(s) > budget:
            out.append([])
            used = 0
        out[-1].append(s)
        used += len(s)
    return out


def timed(work: Callable[[], object], num: int, tokens: int) -> Figures:
    t0 = time.perf_counter()
    work()
    seconds = time.perf_counter() - t0
    return {"texts_per_s": num / seconds, "tokens_per_s": tokens / seconds, "seconds": seconds}


def sentence_transformer():
    from sentence_transformers import SentenceTransformer

    from workers.loader import resolve_model_dir

    return SentenceTransformer(str(resolve_model_dir(MODEL)), device="cpu")


if __name__ == "__main__":
    main()
