"""The checkpoint format: where a model directory is, what its config says, and its weights.

A Hugging Face directory holds config.json and model.safetensors (or shards listed in
model.safetensors.index.json). Weights are handed to each parameter's `weight_loader` as a `View`:
a tensor not yet read, so that a rank reads only the rows or columns of its own shard. Layers know
`View`, never the file.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

PACKAGE = "package:"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def resolve_model_dir(path: str) -> Path:
    """`package:NAME` -> the model directory shipped by Python package NAME; else a directory."""
    if path.startswith(PACKAGE):
        name = path[len(PACKAGE) :]
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"model {path!r}: cannot import package {name!r}: {e}") from e
        getter = getattr(module, "get_model_path", None)
        if getter is not None:
            directory = Path(getter())
        else:
            # A package without the helper is assumed to keep the files next to its code.
            directory = Path(module.__file__).resolve().parent / "model"
    else:
        directory = Path(path).expanduser()
    directory = directory.resolve()
    if not (directory / "config.json").is_file():
        raise ValueError(f"model {path!r}: {directory} has no config.json")
    if not (directory / WEIGHTS).is_file() and not (directory / INDEX).is_file():
        raise ValueError(f"model {path!r}: {directory} has no {WEIGHTS} or {INDEX}")
    return directory


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass(slots=True)
class ModelInfo:
    """What the fleet needs to know of a model, whatever its family."""

    family: str  # a key of workers.models.FAMILIES
    name: str
    path: Path
    decoder: bool  # generates tokens (KV cache, sampling) rather than pooling an embedding
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position: int
    norm_eps: float
    hidden_act: str
    max_seq_length: int  # tokens an input may have (encoders truncate to it)
    tokenizer: Path | None  # tokenizer.json, when the model has one
    eos_token_id: int | None = None
    tie_word_embeddings: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific settings

    def kv_bytes_per_token(self, layers: int, kv_heads: int, dtype: torch.dtype) -> int:
        """K and V of one token in `layers` layers of `kv_heads` heads."""
        return 2 * layers * kv_heads * self.head_dim * dtype.itemsize


class View:
    """One checkpoint tensor, not yet read. `read(dim, start, length)` reads just that slice.

    `transposed` views a 2-D tensor stored [in, out] (GPT-2's Conv1D) as the [out, in] of a
    linear layer, so that layers shard every family's weights alike.
    """

    def __init__(self, handle: Any, name: str, transposed: bool = False) -> None:
        self._slice = handle.get_slice(name)
        self.name, self.transposed = name, transposed
        shape = list(self._slice.get_shape())
        self.shape = shape[::-1] if transposed else shape

    def read(
        self, dim: int | None = None, start: int = 0, length: int | None = None
    ) -> torch.Tensor:
        if dim is None:
            t = self._slice[:]
            return t.t().contiguous() if self.transposed else t
        dim = dim % len(self.shape)
        length = self.shape[dim] - start if length is None else length
        if start < 0 or start + length > self.shape[dim]:
            raise ValueError(f"{self.name}: rows {start}..{start + length} outside {self.shape}")
        stored = (len(self.shape) - 1 - dim) if self.transposed else dim
        index = (slice(None),) * stored + (slice(start, start + length),)
        t = self._slice[index]
        return t.t().contiguous() if self.transposed else t.contiguous()

    def shard(self, dim: int, rank: int, parts: int) -> torch.Tensor:
        """The `rank`-th of `parts` equal contiguous pieces along `dim`."""
        size = self.shape[dim % len(self.shape)]
        if size % parts:
            raise ValueError(f"{self.name}: dim {dim} of size {size} does not split in {parts}")
        return self.read(dim, rank * (size // parts), size // parts)


# A parameter's loader: (parameter, view, shard id or None) -> None. Set as `param.weight_loader`.
WeightLoader = Callable[[nn.Parameter, View, Any], None]


def default_loader(param: nn.Parameter, view: View, shard_id: Any = None) -> None:
    """A replicated parameter: the whole tensor."""
    if list(view.shape) != list(param.shape):
        raise ValueError(f"{view.name}: shape {view.shape}, parameter wants {list(param.shape)}")
    param.copy_(view.read())


@dataclass(slots=True, frozen=True)
class Target:
    """Where one checkpoint tensor goes: a parameter of this stage, which part of it, and
    whether the file stores it transposed."""

    param: str
    shard_id: Any = None
    transposed: bool = False


def files(directory: Path) -> list[Path]:
    index = read_json(directory / INDEX)
    if index is None:
        return [directory / WEIGHTS]
    return [directory / f for f in sorted(set(index["weight_map"].values()))]


def tensors(directory: Path) -> Iterator[tuple[Any, str]]:
    """(handle, name) of every tensor in the checkpoint, file by file."""
    with ExitStack() as stack:
        for path in files(directory):
            handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                yield handle, name


@torch.no_grad()
def load(model: nn.Module, directory: Path, only: set[str] | None = None) -> None:
    """Fill every parameter of `model` (one stage, one rank), or those named in `only`, from
    the checkpoint: the model's `targets(name)` says where each checkpoint tensor goes (nothing,
    for another stage's)."""
    params = dict(model.named_parameters())
    if only is not None:
        params = {k: v for k, v in params.items() if k in only}
    wanted = set(params)
    loaded: set[str] = set()
    for handle, name in tensors(directory):
        for target in model.targets(name):
            param = params.get(target.param)
            if param is None:
                continue
            view = View(handle, name, target.transposed)
            loader: WeightLoader = getattr(param, "weight_loader", default_loader)
            loader(param, view, target.shard_id)
            loaded.add(target.param)
    missing = sorted(wanted - loaded)
    if missing:
        raise ValueError(f"{directory}: no weights for {', '.join(missing[:5])}")


def divide(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise ValueError(f"{what} {n} is not divisible by tensor parallel size {parts}")
    return n // parts


def ceil_div(n: int, d: int) -> int:
    return math.ceil(n / d)
