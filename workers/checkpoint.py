"""Locate a model directory, read its configs, and read (shards of) its weights."""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

PACKAGE = "package:"
WEIGHTS = "model.safetensors"
PREFIXES = ("bert.",)


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
    missing = [f for f in ("config.json", WEIGHTS) if not (directory / f).is_file()]
    if missing:
        raise ValueError(f"model {path!r}: {directory} has no {' or '.join(missing)}")
    return directory


@dataclass(slots=True)
class ModelInfo:
    name: str
    path: Path
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_position: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    max_seq_length: int
    pooling: str
    normalize: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _json(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _name(directory: Path) -> str:
    # Hub model cards start (after front matter) with "# <model id>"; the directory of a
    # packaged model is often just "model", which says nothing.
    readme = directory / "README.md"
    if readme.is_file():
        fenced = False
        for line in readme.read_text(errors="replace").splitlines():
            if line.startswith("```"):
                fenced = not fenced
            elif not fenced and (m := re.fullmatch(r"# (\S+)\s*", line)):
                return m.group(1)
    return directory.name


def _pooling(directory: Path, modules: list) -> str:
    folder = next((m.get("path") for m in modules if m.get("type", "").endswith(".Pooling")), None)
    config = _json(directory / (folder or "1_Pooling") / "config.json")
    if not config:
        return "mean"
    modes = [k for k, v in config.items() if k.startswith("pooling_mode_") and v is True]
    if modes == ["pooling_mode_mean_tokens"]:
        return "mean"
    if modes == ["pooling_mode_cls_token"]:
        return "cls"
    raise ValueError(f"{directory}: unsupported pooling {modes or 'none'}")


def load_info(path: str) -> ModelInfo:
    directory = resolve_model_dir(path)
    config = _json(directory / "config.json")
    if config.get("model_type") != "bert":
        raise ValueError(
            f"{directory}: model_type {config.get('model_type')!r} is not supported (only 'bert')"
        )
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{directory}: only absolute position embeddings are supported")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if hidden % heads:
        raise ValueError(f"{directory}: hidden_size {hidden} not divisible by {heads} heads")
    max_position = config["max_position_embeddings"]
    sbert = _json(directory / "sentence_bert_config.json") or {}
    max_seq_length = min(sbert.get("max_seq_length") or 512, max_position)
    modules = _json(directory / "modules.json") or []
    return ModelInfo(
        name=_name(directory),
        path=directory,
        hidden_size=hidden,
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        intermediate_size=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        max_position=max_position,
        type_vocab_size=config.get("type_vocab_size", 2),
        layer_norm_eps=config.get("layer_norm_eps", 1e-12),
        hidden_act=config.get("hidden_act", "gelu"),
        max_seq_length=max_seq_length,
        pooling=_pooling(directory, modules),
        normalize=any(m.get("type", "").endswith(".Normalize") for m in modules),
    )


class Checkpoint:
    """Read-only view of model.safetensors that hands out shards without reading whole tensors."""

    def __init__(self, path: str | Path) -> None:
        directory = Path(path) if isinstance(path, Path) else resolve_model_dir(path)
        self.file = directory / WEIGHTS
        self._handle = safe_open(str(self.file), framework="pt", device="cpu")
        names = set(self._handle.keys())
        # BertModel checkpoints have bare keys; BertFor* checkpoints nest them under "bert.".
        self.prefix = next((p for p in PREFIXES if any(n.startswith(p) for n in names)), "")
        self.names = names

    def key(self, name: str) -> str:
        for candidate in (self.prefix + name, name):
            if candidate in self.names:
                return candidate
        raise KeyError(f"{self.file}: no tensor {name!r}")

    def shape(self, name: str) -> list[int]:
        return list(self._handle.get_slice(self.key(name)).get_shape())

    def get(
        self, name: str, dim: int | None = None, shard: int = 0, shards: int = 1
    ) -> torch.Tensor:
        """The tensor, or its `shard`-th of `shards` equal contiguous pieces along `dim`."""
        view = self._handle.get_slice(self.key(name))
        if dim is None or shards == 1:
            return view[:]
        shape = view.get_shape()
        dim = dim % len(shape)
        if shape[dim] % shards or not 0 <= shard < shards:
            raise ValueError(
                f"{name}: dim {dim} of size {shape[dim]} can't give shard {shard}/{shards}"
            )
        size = shape[dim] // shards
        index = (slice(None),) * dim + (slice(shard * size, (shard + 1) * size),)
        return view[index].contiguous()

    def close(self) -> None:
        # safe_open has no explicit close; dropping the handle unmaps the file.
        self._handle = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
