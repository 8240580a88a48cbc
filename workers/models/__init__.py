"""The model families Baton serves, by their config.json `model_type`, and how a model is split
into pipeline stages."""

from __future__ import annotations

import torch

from workers.layers.parallel import TPGroup
from workers.loader import ModelInfo, read_json, resolve_model_dir
from workers.models import bert, gpt2, llama
from workers.models.stage import Stage

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


def split_layers(num_layers: int, pipeline: int) -> list[range]:
    """Contiguous layer ranges, one per stage, sizes differing by at most one."""
    if not 1 <= pipeline <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {pipeline} pipeline stages")
    base, extra = divmod(num_layers, pipeline)
    ranges, start = [], 0
    for stage in range(pipeline):
        # Extra layers go to the later stages: the first stage also does the embeddings.
        size = base + (stage >= pipeline - extra)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def build(
    info: ModelInfo,
    stage: int,
    pipeline: int,
    tp: TPGroup,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Stage:
    """Stage `stage` of `pipeline` on this rank, weights loaded."""
    layers = split_layers(info.num_layers, pipeline)[stage]
    model = MODELS[info.family](info, layers, stage == 0, stage == pipeline - 1, tp, device, dtype)
    return model.load()
