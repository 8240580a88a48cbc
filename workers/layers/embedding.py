"""Token and position tables: replicated, or split by vocabulary across the ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.layers.linear import Packed, param
from workers.layers.parallel import TPGroup
from workers.loader import View


class Embedding(nn.Module):
    """Replicated lookup table (BERT's and GPT-2's position tables are small)."""

    def __init__(self, num: int, dim: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = param(num, dim, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class VocabParallelEmbedding(nn.Module):
    """Rank r holds rows [r * per, (r + 1) * per) of the vocabulary (the last rank's tail is
    zero padding); a token outside a rank's range looks up zeros there, and the sum over ranks
    gives every token its row."""

    def __init__(self, vocab: int, dim: int, tp: TPGroup, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.tp, self.vocab = tp, vocab
        self.per = -(-vocab // tp.size)
        self.first = tp.rank * self.per
        self.rows = max(0, min(self.per, vocab - self.first))  # real rows here
        self.weight = param(self.per, dim, dtype=dtype, loader=self.weight_loader)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.first
        outside = (local < 0) | (local >= self.rows)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        y = y.masked_fill(outside[:, None], 0)
        return self.tp.all_reduce(y)

    def weight_loader(self, p: nn.Parameter, view: View, shard_id: object = None) -> None:
        p.zero_()
        if self.rows:
            p[: self.rows].copy_(view.read(0, self.first, self.rows))


class ParallelLMHead(Packed, VocabParallelEmbedding):
    """Logits over the vocabulary: each rank scores its own rows, then all ranks gather them.
    Tied to the token embedding when the model says so (the same checkpoint tensor loads both)."""

    def __init__(
        self,
        vocab: int,
        dim: int,
        tp: TPGroup,
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(vocab, dim, tp, dtype)
        self.bias = param(self.per, dtype=dtype, loader=self.weight_loader) if bias else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.tp.all_gather(self.linear(h, self.bias), dim=-1)[:, : self.vocab]
