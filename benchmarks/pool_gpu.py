"""pool_gpu: issue 8's GPU check of the peer memory pool, in one process on the GPU at hand.

A decoder of about 1.1 B parameters (the TinyLlama shape: 22 layers, hidden 2,048, 32 heads of
which 4 KV heads, MLP 5,632, 32,000 words; random float16 weights written once as a Hugging Face
checkpoint under benchmarks/.models/) runs the same steps all resident and with half of its
weights in the pinned pool (`memory.weight_budget = 0.5`: alternate layers, copied to the GPU
`memory.prefetch_distance` layers ahead on a stream of their own), in turn, in reverse order
every other repeat:

- prefill: 8 prompts of 1,024 tokens (8,192 tokens a step);
- decode: 64 sequences of 512 cached tokens, one new token each.

The pool's host-to-device bandwidth is measured first, by copying its largest layer from the
pinned region into a device buffer. Each step copies every pooled layer once, so a step cannot
take less than max(all-resident step, pooled bytes / that bandwidth): the pooled step is held
to 1.25 times that bound (the copies hidden behind compute), and the stalls (a layer whose copy
had not ended when compute reached it) are counted.

`--device cpu --quick` runs the same code on the CPU with a small shape and the copier thread
(`memory.prefetch = "always"`): a check that the script works, with figures that mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.common import REPO, Figures, Report, Target
from workers.layers.parallel import TPGroup
from workers.models import load_info
from workers.pool import Pooled, Region, layout
from workers.runner import ModelRunner

BILLION = {  # TinyLlama-1.1B's shape
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}
SMALL = {**BILLION, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4}
SMALL |= {"num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1000}
BLOCK = 16
GOAL = 1.25  # pooled step against its bound


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke test: a small model, less work")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps a repeat (default 10)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def checkpoint(shape: dict[str, int]) -> Path:
    """A Llama checkpoint of `shape` with random float16 weights (std 0.02, norms at 1), in
    Hugging Face's layout: transformers' config and parameter names, written with safetensors
    (a model of this size is not initialised by transformers: minutes on a CPU)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    where = (
        REPO
        / "benchmarks"
        / ".models"
        / f"llama-{shape['num_hidden_layers']}x{shape['hidden_size']}"
    )
    stamp = where / "baton-random.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == shape:
        return where
    config = LlamaConfig(tie_word_embeddings=False, torch_dtype="float16", **shape)
    with torch.device("meta"):
        names = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    weights = {
        k: torch.ones(s, dtype=torch.float16)
        if k.endswith("norm.weight")
        else (torch.randn(s, generator=g) * 0.02).to(torch.float16)
        for k, s in names.items()
    }
    where.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(where)
    save_file(weights, str(where / "model.safetensors"), metadata={"format": "pt"})
    stamp.write_text(json.dumps(shape))  # last: a half-made directory is made again
    return where


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Steps:
    """The two workloads' `batch` bodies and tensors, as the controller would send them."""

    def __init__(self, prompts: int, prompt_len: int, decodes: int, cached: int, vocab: int):
        g = torch.Generator().manual_seed(1)
        blocks = -(-max(prompt_len, cached + 1) // BLOCK)
        self.blocks = max(prompts, decodes) * blocks
        self.prefill = self._step([prompt_len] * prompts, [0] * prompts, blocks, vocab, g)
        self.decode = self._step([1] * decodes, [cached] * decodes, blocks, vocab, g)

    @staticmethod
    def _step(
        new: list[int], cached: list[int], blocks: int, vocab: int, g: torch.Generator
    ) -> tuple[dict, list[torch.Tensor]]:
        tables = torch.arange(len(new) * blocks, dtype=torch.int32).view(len(new), blocks)
        slots = [
            int(tables[i, p // BLOCK]) * BLOCK + p % BLOCK
            for i, (n, c) in enumerate(zip(new, cached, strict=True))
            for p in range(c, c + n)
        ]
        body = {
            "task": "generate",
            "seq_lens": new,
            "context_lens": [c + n for n, c in zip(new, cached, strict=True)],
            "sample": [[i, 0.0, 0, 1.0, -1, 0] for i in range(len(new))],
        }
        x = torch.randint(vocab, (sum(new),), generator=g)
        return body, [x, torch.tensor(slots), tables]


def timed(runner: ModelRunner, step: tuple[dict, list[torch.Tensor]], n: int) -> Figures:
    """Median milliseconds of a step over n (after two untimed), and the stalls among them."""
    body, tensors = step
    for _ in range(2):
        runner.run(body, tensors)
    sync(runner.device)
    stalls = runner.counters().get("stalls", 0)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        runner.run(body, tensors)
        sync(runner.device)
        times.append((time.perf_counter() - t0) * 1000)
    return {"ms": statistics.median(times), "stalls": runner.counters().get("stalls", 0) - stalls}


def bandwidth(region: Region, pooled: Pooled, device: torch.device) -> float:
    """GB/s of copying the largest pooled entry from the region into a device buffer (median
    of 5): what the prefetcher's copies run at."""
    entry = max(pooled.entries, key=lambda e: e.nbytes)
    src = torch.frombuffer(region.map, dtype=torch.uint8, count=entry.nbytes, offset=entry.offset)
    dst = torch.empty(entry.nbytes, dtype=torch.uint8, device=device)
    rates = []
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync(device)
        rates.append(entry.nbytes / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates[1:])


def main(argv: Sequence[str] | None = None) -> dict:
    a = parse(argv)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    shape = SMALL if a.quick else BILLION
    model = checkpoint(shape)
    info = load_info(str(model))
    dtype = torch.float16 if cuda else torch.float32
    steps = Steps(8, 128 if a.quick else 1024, 64, 64 if a.quick else 512, info.vocab_size)
    kv = steps.blocks * BLOCK * info.kv_bytes_per_token(info.num_layers, info.num_kv_heads, dtype)
    solo = TPGroup(0, 1, None)
    plan = layout(info, 1, 1, str(dtype).removeprefix("torch."), None, 0.5, device=a.device)
    path = Path("/dev/shm") / f"baton-bench-{uuid.uuid4().hex}.pool"
    region = Region.create(path, plan.size)
    try:
        if cuda:
            region.pin()
        pooled = Pooled.of(region, plan, 0, 0)
        assert pooled is not None, "the plan pools nothing at half the budget"
        kw = dict(device=a.device, dtype=dtype, block_size=BLOCK, kv_memory=kv)
        runners = {
            "resident": ModelRunner(info, 0, 1, solo, **kw),
            "pooled": ModelRunner(info, 0, 1, solo, pooled=pooled, prefetch="always", **kw),
        }
        gbps = bandwidth(region, pooled, device)
        pooled_bytes = plan.pooled[0, 0]
        common.log(f"pool: {pooled_bytes / 1e9:.2f} GB pooled, copies at {gbps:.1f} GB/s")
        alternatives: dict[str, Callable[[], Figures]] = {
            f"{work}: {name}": (lambda r=r, s=s: timed(r, s, 3 if a.quick else a.steps))
            for work, s in (("prefill", steps.prefill), ("decode", steps.decode))
            for name, r in runners.items()
        }
        runs = common.interleave(alternatives, 1 if a.quick else a.repeats, alternate=True)
    finally:
        region.close()
        path.unlink(missing_ok=True)
    copy_ms = pooled_bytes / (gbps * 1e9) * 1000
    ratios = {}
    for work in ("prefill", "decode"):
        pairs = zip(runs[f"{work}: pooled"], runs[f"{work}: resident"], strict=True)
        ratios[f"{work}_pooled_vs_bound"] = [p["ms"] / max(r["ms"], copy_ms) for p, r in pairs]
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    report = Report(
        "pool_gpu",
        f"Half the weights in the pinned pool, copied ahead, on one {name}",
        "ms",
        runs,
        ratios,
        [Target(r, "<=", GOAL) for r in ratios],
        {
            "device": name,
            "parameters": sum(p.numel() for p in runners["resident"].model.parameters()),
            "dtype": str(dtype),
            "pooled_bytes": pooled_bytes,
            "pool_copy_gb_per_s": gbps,
            "pooled_copy_ms_per_step": copy_ms,
            "prefill_tokens": sum(steps.prefill[0]["seq_lens"]),
            "decode_sequences": len(steps.decode[0]["seq_lens"]),
        },
        notes=[
            "bound = max(all-resident step, pooled bytes per step / the pool's measured copy "
            "bandwidth); stalls: layers whose copy had not ended when compute reached them"
        ],
    )
    return common.write(report, a.quick)


if __name__ == "__main__":
    main()
