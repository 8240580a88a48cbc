"""BERT encoder (sentence-transformers flavour) as pipeline stages over packed, unpadded batches.

A batch is n sequences laid end to end: ids [T] or hidden [T, hidden] plus `seq_lens`.
Everything but attention is per token, so it runs on all T tokens at once; attention runs
per sequence (sequences of equal length share one call), so no token attends across a
sequence boundary and nothing is padded to the batch's longest.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from workers import packing
from workers.checkpoint import Checkpoint, ModelInfo
from workers.dist import TPGroup
from workers.layers import (
    ColumnParallelLinear,
    Embedding,
    LayerNorm,
    QKVParallelLinear,
    RowParallelLinear,
)

ACTIVATIONS = {
    "gelu": F.gelu,  # exact erf form, as HF's "gelu"
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


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


@dataclass(slots=True)
class Batch:
    """How to run attention for one forward: per length group (packed) or with a key mask."""

    seq_lens: list[int]
    padded: bool
    # packed: (count, length, token indices [count*length]) per distinct sequence length
    groups: list[tuple[int, int, torch.Tensor]]
    # padded: [n, 1, 1, max_len], True where the key is a real token
    key_mask: torch.Tensor | None

    @staticmethod
    def make(seq_lens: list[int], padded: bool, device: torch.device) -> Batch:
        if padded:
            return Batch(seq_lens, True, [], packing.mask(seq_lens, device)[:, None, None, :])
        starts: dict[int, list[int]] = {}
        for start, length in zip(packing.offsets(seq_lens)[:-1], seq_lens, strict=True):
            starts.setdefault(length, []).append(start)
        groups = []
        for length, s in starts.items():
            index = (torch.tensor(s)[:, None] + torch.arange(length)).flatten()
            groups.append((len(s), length, index.to(device)))
        return Batch(seq_lens, False, groups, None)


class Embeddings(nn.Module):
    def __init__(self, info: ModelInfo, dtype: torch.dtype) -> None:
        super().__init__()
        self.word = Embedding(info.vocab_size, info.hidden_size, dtype=dtype)
        self.position = Embedding(info.max_position, info.hidden_size, dtype=dtype)
        self.token_type = Embedding(info.type_vocab_size, info.hidden_size, dtype=dtype)
        self.norm = LayerNorm(info.hidden_size, info.layer_norm_eps, dtype=dtype)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Single-segment inputs: token type is always 0. Same summation order as HF.
        x = self.word(ids) + self.token_type.weight[0]
        return self.norm(x + self.position(positions))

    def load(self, ckpt: Checkpoint) -> None:
        self.word.weight_loader(ckpt, "embeddings.word_embeddings")
        self.position.weight_loader(ckpt, "embeddings.position_embeddings")
        self.token_type.weight_loader(ckpt, "embeddings.token_type_embeddings")
        self.norm.weight_loader(ckpt, "embeddings.LayerNorm")


class Attention(nn.Module):
    """Self-attention over this rank's heads; the output projection sums over ranks."""

    def __init__(self, info: ModelInfo, tp: TPGroup, dtype: torch.dtype) -> None:
        super().__init__()
        self.qkv = QKVParallelLinear(info.hidden_size, info.num_heads, tp, dtype=dtype)
        self.heads, self.head_dim = self.qkv.heads, info.head_dim
        self.out = RowParallelLinear(info.hidden_size, info.hidden_size, tp, dtype=dtype)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.heads, self.head_dim)) for t in self.qkv(x))
        o = padded_attention(q, k, v, batch) if batch.padded else packed_attention(q, k, v, batch)
        return self.out(o.flatten(-2))

    def load(self, ckpt: Checkpoint, prefix: str) -> None:
        self.qkv.weight_loader(ckpt, f"{prefix}.self")
        self.out.weight_loader(ckpt, f"{prefix}.output.dense")


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch
) -> torch.Tensor:
    """q, k, v [T, heads, d] -> [T, heads, d], attending only within each sequence."""
    out = torch.empty_like(q)
    heads, d = q.shape[1:]
    for count, length, index in batch.groups:
        # Gather equal-length sequences into [count, heads, length, d]: a dense batch
        # with no padding, since every member has the same length.
        qg, kg, vg = (
            t.index_select(0, index).view(count, length, heads, d).transpose(1, 2)
            for t in (q, k, v)
        )
        o = F.scaled_dot_product_attention(qg, kg, vg)
        out.index_copy_(0, index, o.transpose(1, 2).reshape(count * length, heads, d))
    return out


def padded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch
) -> torch.Tensor:
    """q, k, v [n, max_len, heads, d] -> same shape; padded keys are masked out."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.key_mask)
    return o.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, info: ModelInfo, tp: TPGroup, dtype: torch.dtype) -> None:
        super().__init__()
        if info.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {info.hidden_act!r}")
        self.up = ColumnParallelLinear(info.hidden_size, info.intermediate_size, tp, dtype=dtype)
        self.act = ACTIVATIONS[info.hidden_act]
        self.down = RowParallelLinear(info.intermediate_size, info.hidden_size, tp, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))

    def load(self, ckpt: Checkpoint, prefix: str) -> None:
        self.up.weight_loader(ckpt, f"{prefix}.intermediate.dense")
        self.down.weight_loader(ckpt, f"{prefix}.output.dense")


class Layer(nn.Module):
    """Post-LayerNorm transformer block, as in BERT."""

    def __init__(self, info: ModelInfo, tp: TPGroup, dtype: torch.dtype) -> None:
        super().__init__()
        self.attention = Attention(info, tp, dtype)
        self.attention_norm = LayerNorm(info.hidden_size, info.layer_norm_eps, dtype=dtype)
        self.mlp = MLP(info, tp, dtype)
        self.mlp_norm = LayerNorm(info.hidden_size, info.layer_norm_eps, dtype=dtype)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        x = self.attention_norm(x + self.attention(x, batch))
        return self.mlp_norm(x + self.mlp(x))

    def load(self, ckpt: Checkpoint, prefix: str) -> None:
        self.attention.load(ckpt, f"{prefix}.attention")
        self.attention_norm.weight_loader(ckpt, f"{prefix}.attention.output.LayerNorm")
        self.mlp.load(ckpt, prefix)
        self.mlp_norm.weight_loader(ckpt, f"{prefix}.output.LayerNorm")


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


class BertStage(nn.Module):
    """Layers `layers` of the model on this TP rank; embeddings if `first`, pooling if `last`."""

    def __init__(
        self,
        info: ModelInfo,
        layers: range,
        first: bool,
        last: bool,
        tp: TPGroup,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if layers and not (layers[0] >= 0 and layers[-1] < info.num_layers):
            raise ValueError(f"layers {layers} outside the model's 0..{info.num_layers - 1}")
        self.info, self.layer_ids, self.first, self.last, self.tp = info, layers, first, last, tp
        self.device = torch.device(device)
        # Parameters are created straight on the device, each rank only its own shard.
        with self.device:
            self.embeddings = Embeddings(info, dtype) if first else None
            self.layers = nn.ModuleList(Layer(info, tp, dtype) for _ in layers)
        self.eval()  # inference only; there is no dropout anyway

    @torch.no_grad()
    def load(self, ckpt: Checkpoint) -> BertStage:
        if self.embeddings is not None:
            self.embeddings.load(ckpt)
        for i, layer in zip(self.layer_ids, self.layers, strict=True):
            layer.load(ckpt, f"encoder.layer.{i}")
        return self

    def forward(self, x: torch.Tensor, seq_lens: list[int], padded: bool = False) -> torch.Tensor:
        """Packed ids [T] (first stage) or hidden [T, hidden] -> hidden [T, hidden], or the
        pooled embeddings [n, hidden] if last. `padded` runs the same math on a batch padded
        to its longest sequence, for comparison."""
        if x.shape[0] != sum(seq_lens) or min(seq_lens, default=1) < 1:
            raise ValueError(f"{x.shape[0]} tokens do not match non-empty seq_lens {seq_lens}")
        if self.embeddings is not None:
            if max(seq_lens, default=0) > self.info.max_position:
                raise ValueError(f"sequence longer than {self.info.max_position} positions")
            x = self.embeddings(x, packing.positions(seq_lens, x.device))
        batch = Batch.make(seq_lens, padded, x.device)
        if padded:
            x = packing.pad(x, seq_lens)
        for layer in self.layers:
            x = layer(x, batch)
        if padded:
            x = packing.unpad(x, seq_lens)
        if self.last:
            return pool(x, seq_lens, self.info.pooling, self.info.normalize)
        return x
