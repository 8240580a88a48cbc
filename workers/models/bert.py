"""BERT encoders (sentence-transformers flavour) as pipeline stages over packed, unpadded batches.

A batch is n sequences laid end to end: ids [T] or hidden [T, hidden] plus their lengths.
Everything but attention is per token, so it runs on all T tokens at once; attention runs per
sequence (sequences of equal length share one call), so nothing is padded to the batch's longest.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers import packing
from workers.layers.attention import Context, SelfAttention
from workers.layers.embedding import Embedding
from workers.layers.mlp import MLP
from workers.layers.norm import LayerNorm
from workers.layers.parallel import TPGroup
from workers.loader import ModelInfo, Target, read_json
from workers.models.stage import Stage


def parse(config: dict[str, Any], directory: Path) -> ModelInfo:
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{directory}: only absolute position embeddings are supported")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if hidden % heads:
        raise ValueError(f"{directory}: hidden_size {hidden} not divisible by {heads} heads")
    max_position = config["max_position_embeddings"]
    sbert = read_json(directory / "sentence_bert_config.json") or {}
    modules = read_json(directory / "modules.json") or []
    tokenizer = directory / "tokenizer.json"
    return ModelInfo(
        family="bert",
        name=_name(directory),
        path=directory,
        decoder=False,
        hidden_size=hidden,
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        max_position=max_position,
        norm_eps=config.get("layer_norm_eps", 1e-12),
        hidden_act=config.get("hidden_act", "gelu"),
        max_seq_length=min(sbert.get("max_seq_length") or 512, max_position),
        tokenizer=tokenizer if tokenizer.is_file() else None,
        extra={
            "type_vocab_size": config.get("type_vocab_size", 2),
            "pooling": _pooling(directory, modules),
            "normalize": any(m.get("type", "").endswith(".Normalize") for m in modules),
        },
    )


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
    config = read_json(directory / (folder or "1_Pooling") / "config.json")
    if not config:
        return "mean"
    modes = [k for k, v in config.items() if k.startswith("pooling_mode_") and v is True]
    if modes == ["pooling_mode_mean_tokens"]:
        return "mean"
    if modes == ["pooling_mode_cls_token"]:
        return "cls"
    raise ValueError(f"{directory}: unsupported pooling {modes or 'none'}")


class Embeddings(nn.Module):
    def __init__(self, info: ModelInfo, dtype: torch.dtype) -> None:
        super().__init__()
        self.word = Embedding(info.vocab_size, info.hidden_size, dtype=dtype)
        self.position = Embedding(info.max_position, info.hidden_size, dtype=dtype)
        self.token_type = Embedding(info.extra["type_vocab_size"], info.hidden_size, dtype=dtype)
        self.norm = LayerNorm(info.hidden_size, info.norm_eps, dtype=dtype)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Single-segment inputs: token type is always 0. Same summation order as HF.
        x = self.word(ids) + self.token_type.weight[0]
        return self.norm(x + self.position(positions))


class Layer(nn.Module):
    """Post-LayerNorm transformer block, as in BERT. Attention and MLP compute in `dtype`; the
    residual stream and the norms stay in `residual`, so that in half precision only the
    matmuls' inputs and outputs are rounded, not the hidden state carried from layer to layer
    (rounded at every layer, it cost MiniLM's bfloat16 embeddings their 0.9999 cosine)."""

    def __init__(
        self, info: ModelInfo, tp: TPGroup, dtype: torch.dtype, residual: torch.dtype
    ) -> None:
        super().__init__()
        h = info.hidden_size
        heads, d = info.num_heads, info.head_dim
        self.dtype = dtype
        self.attention = SelfAttention(h, heads, heads, d, tp, dtype=dtype)
        self.attention_norm = LayerNorm(h, info.norm_eps, dtype=residual)
        self.mlp = MLP(h, info.intermediate_size, info.hidden_act, tp, dtype)
        self.mlp_norm = LayerNorm(info.hidden_size, info.norm_eps, dtype=residual)

    def forward(
        self, x: torch.Tensor, xc: torch.Tensor, ctx: Context
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream x and its copy in `dtype` (xc; x itself in float32) -> the same
        after this layer: each norm rounds its own output for the matmul that reads it."""
        x, xc = self.attention_norm.add(x, self.attention(xc, ctx), self.dtype)
        return self.mlp_norm.add(x, self.mlp(xc), self.dtype)


# checkpoint name (after any "bert." prefix) -> (our parameter path, shard id)
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")
_LAYER_PARTS = {
    "attention.self.query": ("attention.qkv", "q"),
    "attention.self.key": ("attention.qkv", "k"),
    "attention.self.value": ("attention.qkv", "v"),
    "attention.output.dense": ("attention.out", None),
    "attention.output.LayerNorm": ("attention_norm", None),
    "intermediate.dense": ("mlp.up", None),
    "output.dense": ("mlp.down", None),
    "output.LayerNorm": ("mlp_norm", None),
}
_EMBEDDINGS = {
    "word_embeddings": "word",
    "position_embeddings": "position",
    "token_type_embeddings": "token_type",
    "LayerNorm": "norm",
}


def pool(x: torch.Tensor, seq_lens: list[int], how: str, normalize: bool) -> torch.Tensor:
    """Packed hidden [T, hidden] -> one float32 embedding per sequence [n, hidden]."""
    x = x.float()  # sums over up to 512 tokens: keep them in float32 whatever the model dtype
    if how == "cls":
        out = x[packing.offsets(seq_lens)[:-1]]
    else:
        segments = packing.segments(seq_lens, x.device)
        out = x.new_zeros(len(seq_lens), x.shape[1]).index_add_(0, segments, x)
        out = out / torch.tensor(seq_lens, dtype=x.dtype, device=x.device)[:, None]
    return F.normalize(out, p=2, dim=1) if normalize else out


class Bert(Stage):
    """Layers `layers` of the encoder on this TP rank; embeddings if `first`, pooling if `last`."""

    def build(self, info: ModelInfo, dtype: torch.dtype) -> None:
        # float32 residual stream whatever the matmuls' dtype; the embeddings are a lookup and
        # a norm, so they stay float32 too (no matmul to speed up, only precision to lose)
        self.dtype, self.residual = dtype, torch.promote_types(dtype, torch.float32)
        self.embeddings = Embeddings(info, self.residual) if self.first else None
        self.layers = nn.ModuleDict(
            {str(i): Layer(info, self.tp, dtype, self.residual) for i in self.layer_ids}
        )

    def targets(self, name: str) -> list[Target]:
        name = name.removeprefix("bert.")
        if name.startswith("embeddings."):
            table, _, kind = name[len("embeddings.") :].rpartition(".")
            return (
                [Target(f"embeddings.{_EMBEDDINGS[table]}.{kind}")] if table in _EMBEDDINGS else []
            )
        m = _LAYER.fullmatch(name)
        if m is None or m.group(2) not in _LAYER_PARTS:
            return []
        path, shard = _LAYER_PARTS[m.group(2)]
        return [Target(f"layers.{m.group(1)}.{path}.{m.group(3)}", shard)]

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Packed ids [T] (first stage) or hidden [T, hidden] -> hidden [T, hidden], or the
        pooled embeddings [n, hidden] if last. A `padded` context runs the same math on a batch
        padded to its longest sequence, for comparison."""
        seq_lens = ctx.seq_lens
        if x.shape[0] != sum(seq_lens) or min(seq_lens, default=1) < 1:
            raise ValueError(f"{x.shape[0]} tokens do not match non-empty seq_lens {seq_lens}")
        if self.embeddings is not None:
            if max(seq_lens, default=0) > self.info.max_position:
                raise ValueError(f"sequence longer than {self.info.max_position} positions")
            x = self.embeddings(x, ctx.positions)
        x = x.to(self.residual)  # from the stage before: sent in the model's dtype
        if ctx.padded:
            x = packing.pad(x, seq_lens)
        xc = x.to(self.dtype)
        for layer in self.layers.values():
            x, xc = layer(x, xc, ctx)
        if ctx.padded:
            x = packing.unpad(x, seq_lens)
        if self.last:
            return pool(x, seq_lens, self.info.extra["pooling"], self.info.extra["normalize"])
        return x.to(self.dtype)  # the next stage's input, as limits.max_message_bytes plans it
