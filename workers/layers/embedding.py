"""Token and position tables: replicated, or split by vocabulary across the ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.backends import mkldnn

from workers.layers.linear import param
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


class ParallelLMHead(VocabParallelEmbedding):
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
        self.packed: torch.Tensor | None = None

    def pack(self) -> None:
        """Once loaded, on a CPU with oneDNN: the float32 weight moves into oneDNN's blocked
        layout, once. The head is the largest matrix of a small decoder and meets only a few
        rows a step (one per sampling sequence); there the plain GEMM read it at a third of the
        memory's speed (re-packing it each call, by the look of it), and the packed one ran
        1.35-2x faster (docs/performance.md)."""
        w = self.weight
        if w.device.type != "cpu" or w.dtype != torch.float32 or not mkldnn.is_available():
            return
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach())
        self.weight = None  # the packed copy replaces it: the weight's bytes exist once

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.packed is not None:
            logits = torch.ops.mkldnn._linear_pointwise(h, self.packed, self.bias, "none", [], "")
        else:
            logits = F.linear(h, self.weight, self.bias)
        return self.tp.all_gather(logits, dim=-1)[:, : self.vocab]
