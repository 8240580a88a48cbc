"""The model families Baton serves, by their config.json `model_type`, and how a model is split
into pipeline stages."""

from __future__ import annotations

import torch

from workers.layers.parallel import TPGroup
from workers.loader import ModelInfo, read_json, resolve_model_dir
from workers.models import bert, gpt2, llama
from workers.models.stage import Stage
from workers.pool import Pooled

FAMILIES = {"bert": bert, "gpt2": gpt2, "llama": llama}
MODELS: dict[str, type[Stage]] = {"bert": bert.Bert, "gpt2": gpt2.GPT2, "llama": llama.Llama}


def load_info(path: str) -> ModelInfo:
    """What the model at `path` (a directory or `package:NAME`) is, from its config files."""
    directory = resolve_model_dir(path)
    config = read_json(directory / "config.json")
    family = config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(
            f"{directory}: model_type {family!r} is not supported "
            f"(supported: {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[family].parse(config, directory)


# A decoder's last stage also runs the LM head, on the tokens that sample: one per decoding
# sequence, one per prompt. With outputs about as long as prompts (the generation workloads of
# benchmarks/), about half of the tokens a stage computes pass through it.
SAMPLED_SHARE = 0.5
# What a parameter of the LM head costs against a parameter of a layer, measured on CPU with the
# GPT-2 layout of benchmarks/ through the fleet (1 thread a worker, 128 mixed jobs), from each
# stage's busy share: with every matrix packed for oneDNN, 88 % and 83 % at 5 + 3 put the head
# at 1.7 layers a computed token on an AVX-512 EPYC, where its parameters say 4.1 (with only the
# head packed it was 1.0 there, 1.2 on an AVX2 EPYC). A layer spends much of its time outside its
# matmuls (attention over the cache, norms, Python between them); the head is one large matmul.
HEAD_EFFICIENCY = 0.4


def head_cost(info: ModelInfo) -> float:
    """The LM head's work per computed token, in units of one layer's."""
    if not info.decoder:
        return 0.0  # an encoder's pooling is a sum over tokens: nothing beside a layer
    h, q, kv = info.hidden_size, info.num_heads * info.head_dim, info.num_kv_heads * info.head_dim
    mlp = (3 if MODELS[info.family].gated else 2) * h * info.intermediate_size
    params = info.vocab_size * h / (h * (q + 2 * kv) + q * h + mlp)
    return SAMPLED_SHARE * HEAD_EFFICIENCY * params


def split_layers(num_layers: int, pipeline: int, head: float = 0.0) -> list[range]:
    """Contiguous layer ranges, one per stage, at least one layer each, balancing the stages'
    work when the last one also carries `head` layers' worth (the LM head): it then takes fewer
    layers, and the others split the rest with sizes differing by at most one."""
    if not 1 <= pipeline <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {pipeline} pipeline stages")
    if head > 0 and pipeline > 1:

        def slowest(last: int) -> float:
            return max(-(-(num_layers - last) // (pipeline - 1)), last + head)

        last = min(range(1, num_layers - pipeline + 2), key=slowest)
        return [
            *split_layers(num_layers - last, pipeline - 1),
            range(num_layers - last, num_layers),
        ]
    base, extra = divmod(num_layers, pipeline)
    ranges, start = [], 0
    for stage in range(pipeline):
        # Extra layers go to the later stages: the first stage also does the embeddings.
        size = base + (stage >= pipeline - extra)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def plan(info: ModelInfo, pipeline: int, stages: list[int] | None = None) -> list[range]:
    """Each stage's layers: `stages` (layer counts, first to last) when given, else planned."""
    if not stages:
        return split_layers(info.num_layers, pipeline, head_cost(info))
    starts = [sum(stages[:i]) for i in range(len(stages))]
    return [range(a, a + n) for a, n in zip(starts, stages, strict=True)]


def build(
    info: ModelInfo,
    stage: int,
    pipeline: int,
    tp: TPGroup,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    stages: list[int] | None = None,
    pooled: Pooled | None = None,
    screen: bool = False,
) -> Stage:
    """Stage `stage` of `pipeline` on this rank, weights loaded; `stages` (layers per stage)
    overrides the planned split; `pooled`, the parameters that live in the pool; `screen`, a
    decoder's LM head screens greedy rows in bfloat16 where it can (ParallelLMHead)."""
    layers = plan(info, pipeline, stages)[stage]
    model = MODELS[info.family](info, layers, stage == 0, stage == pipeline - 1, tp, device, dtype)
    head = getattr(model, "lm_head", None)
    if head is not None:
        head.screen = screen  # before loading: it decides how the weight is kept
    return model.load(pooled)


def shapes(
    info: ModelInfo,
    tensor: int,
    pipeline: int,
    dtype: torch.dtype = torch.float32,
    stages: list[int] | None = None,
) -> dict[tuple[int, int], Stage]:
    """Every (stage, tensor rank)'s model on the meta device: its parameters' shapes and dtypes,
    no memory, no weights (what the pool's plan is made from)."""
    ranges = plan(info, pipeline, stages)
    return {
        (s, r): MODELS[info.family](
            info, ranges[s], s == 0, s == pipeline - 1, TPGroup(r, tensor, None), "meta", dtype
        )
        for s in range(pipeline)
        for r in range(tensor)
    }
