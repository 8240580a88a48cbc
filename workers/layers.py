"""Tensor-parallel building blocks: each rank allocates and loads only its own shard."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.checkpoint import Checkpoint
from workers.dist import TPGroup


def _param(*shape: int, dtype: torch.dtype | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def _divide(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise ValueError(f"{what} {n} is not divisible by tensor parallel size {parts}")
    return n // parts


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split across ranks; output stays sharded."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tp: TPGroup,
        bias: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.out_local = _divide(out_features, tp.size, "out_features")
        self.weight = _param(self.out_local, in_features, dtype=dtype)
        self.bias = _param(self.out_local, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def weight_loader(self, ckpt: Checkpoint, prefix: str) -> None:
        shard = dict(dim=0, shard=self.tp.rank, shards=self.tp.size)
        self.weight.copy_(ckpt.get(f"{prefix}.weight", **shard))
        if self.bias is not None:
            self.bias.copy_(ckpt.get(f"{prefix}.bias", **shard))


class QKVParallelLinear(nn.Module):
    """Query, key and value projections fused into one matmul, split across ranks by whole heads.

    Checkpoint rows are head-major, so rank r's heads are rows [r*h*d, (r+1)*h*d) of each of
    query/key/value, which is exactly the r-th contiguous shard along dim 0.
    """

    parts = ("query", "key", "value")

    def __init__(
        self, hidden: int, num_heads: int, tp: TPGroup, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.tp = tp
        self.heads = _divide(num_heads, tp.size, "num_heads")
        self.width = self.heads * (hidden // num_heads)
        self.weight = _param(3 * self.width, hidden, dtype=dtype)
        self.bias = _param(3 * self.width, dtype=dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return F.linear(x, self.weight, self.bias).split(self.width, dim=-1)

    def weight_loader(self, ckpt: Checkpoint, prefix: str) -> None:
        shard = dict(dim=0, shard=self.tp.rank, shards=self.tp.size)
        for i, part in enumerate(self.parts):
            rows = slice(i * self.width, (i + 1) * self.width)
            self.weight[rows].copy_(ckpt.get(f"{prefix}.{part}.weight", **shard))
            self.bias[rows].copy_(ckpt.get(f"{prefix}.{part}.bias", **shard))


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split across ranks; takes sharded x, returns full y."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tp: TPGroup,
        bias: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.in_local = _divide(in_features, tp.size, "in_features")
        self.weight = _param(out_features, self.in_local, dtype=dtype)
        self.bias = _param(out_features, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        # The bias is replicated, so add it after the sum or it would count tp.size times.
        return y + self.bias if self.bias is not None else y

    def weight_loader(self, ckpt: Checkpoint, prefix: str) -> None:
        self.weight.copy_(
            ckpt.get(f"{prefix}.weight", dim=1, shard=self.tp.rank, shards=self.tp.size)
        )
        if self.bias is not None:
            self.bias.copy_(ckpt.get(f"{prefix}.bias"))


class LayerNorm(nn.LayerNorm):
    """Replicated LayerNorm that loads `<prefix>.weight` / `<prefix>.bias`."""

    def __init__(self, hidden: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__(hidden, eps=eps, dtype=dtype)
        self.requires_grad_(False)

    def weight_loader(self, ckpt: Checkpoint, prefix: str) -> None:
        self.weight.copy_(ckpt.get(f"{prefix}.weight"))
        self.bias.copy_(ckpt.get(f"{prefix}.bias"))


class Embedding(nn.Module):
    """Replicated lookup table: BERT's tables are small next to the encoder."""

    def __init__(self, num: int, dim: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = _param(num, dim, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def weight_loader(self, ckpt: Checkpoint, prefix: str) -> None:
        self.weight.copy_(ckpt.get(f"{prefix}.weight"))
