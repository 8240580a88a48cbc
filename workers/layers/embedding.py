"""Token and position tables: replicated, or split by vocabulary across the ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.layers.linear import Packed, amx, param
from workers.layers.parallel import TPGroup
from workers.layers.screen import Int8Copy, screenable
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
    Tied to the token embedding when the model says so (the same checkpoint tensor loads both).

    Screened (`screen` set before loading; a private weight on a CPU with int8 matmuls): greedy
    rows take the argmax of the head's logits without the head's matmul (`greedy`). The head
    keeps its weight plain (the candidates' rows are read from it, and rows that draw get their
    logits from it) and an int8 copy in oneDNN's layout, which scores every word; each word's
    int8 logit is within a bound of the head's, and the few words that bound leaves in the
    running are scored again from the weight (workers/layers/screen.py, `screen.cpp`)."""

    screen: bool = False
    int8: Int8Copy | None = None

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

    def pack(self, pool_packed: bool = False) -> None:
        w = self.weight
        if not (self.screen and w is not None and screenable(w)):
            super().pack(pool_packed)
            return
        self.int8 = Int8Copy.of(w)
        self.plain = True
        self.round_rows = w.dtype == torch.bfloat16 and amx()  # drawn rows' logits

    @property
    def screened(self) -> bool:
        return self.int8 is not None

    def greedy(self, h: torch.Tensor) -> torch.Tensor:
        """Each row's argmax over the head's logits (the first word of the largest; token ids
        [S]), from the int8 logits and the bound, on every rank."""
        assert self.int8 is not None and self.weight is not None
        if self.rows:
            ids, values = self.int8.argmax(h, self.weight, self.bias, self.rows)
        else:  # a rank of padding only
            ids = torch.zeros(h.shape[0], dtype=torch.long)
            values = torch.full((h.shape[0],), float("-inf"))
        if self.tp.size == 1:
            return ids
        return first_best(
            self.tp.all_gather(values[None], dim=0), self.tp.all_gather(ids[None] + self.first, 0)
        )


def first_best(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """values, ids [ranks, S]: each rank's best word of each row (the ranks' words in order) ->
    the best over the ranks: the largest value, the first NaN, a tie to the earlier rank."""
    best, out = values[0], ids[0]
    for v, i in zip(values[1:], ids[1:], strict=True):
        up = (v > best) | (v.isnan() & ~best.isnan())
        best, out = torch.where(up, v, best), torch.where(up, i, out)
    return out
