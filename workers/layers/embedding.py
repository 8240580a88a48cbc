"""Token and position tables: replicated, or split by vocabulary across the ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.layers import native
from workers.layers.linear import Packed, amx, onednn, param
from workers.layers.parallel import TPGroup
from workers.loader import View
from workers.pool import pooled
from workers.precision import refusal


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

    Screened (`screen` set before loading; a private float32 weight on a CPU with bfloat16
    matmuls): greedy rows take float32's argmax without float32's matmul (`greedy`). The head
    keeps its weight plain (the candidates' rows are read from it, and rows that draw get their
    logits from it) and a bfloat16 copy in oneDNN's layout, which scores every word; each
    word's bfloat16 logit is within a bound of its float32 one, and the few words that bound
    leaves in the running are scored again in float32 (`screen.cpp`)."""

    screen: bool = False
    approx: torch.Tensor | None = None  # the bfloat16 copy, packed
    norms: torch.Tensor | None = None  # |w_j| of each word's row, float32

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

    def pack(self) -> None:
        w = self.weight
        if not (self.screen and w is not None and screenable(w)):
            super().pack()
            return
        self.approx = torch.ops.mkldnn._reorder_linear_weight(w.detach().to(torch.bfloat16))
        self.norms = w.detach().norm(dim=1)
        self.plain = True

    @property
    def screened(self) -> bool:
        return self.approx is not None

    def greedy(self, h: torch.Tensor) -> torch.Tensor:
        """Each row's argmax over the float32 logits (the first word of the largest; token ids
        [S]), from the bfloat16 logits and the bound, on every rank."""
        assert self.approx is not None and self.weight is not None and self.norms is not None
        x = h.contiguous()
        kernels = native.kernels()
        assert kernels is not None  # `screenable` built it
        if self.rows:
            # on AMX at a few row counts, as a bfloat16 layer's (`Packed.round_rows`)
            approx = onednn(x.to(torch.bfloat16), self.approx, None, amx())
            c1, c2 = bounds(x.shape[1])
            ids, values = kernels.screen_argmax(
                approx, x, self.weight, self.norms, self.bias, self.rows, c1, c2
            )
        else:  # a rank of padding only
            ids = torch.zeros(x.shape[0], dtype=torch.long)
            values = torch.full((x.shape[0],), float("-inf"))
        if self.tp.size == 1:
            return ids
        return first_best(
            self.tp.all_gather(values[None], dim=0), self.tp.all_gather(ids[None] + self.first, 0)
        )


def screenable(w: torch.Tensor) -> bool:
    """Whether a screened head pays and can run: a private float32 weight on a CPU that computes
    bfloat16 (AMX or AVX-512 BF16; measured 3x float32's matmul) and the C++ kernels built."""
    return (
        w.device.type == "cpu"
        and w.dtype == torch.float32
        and not pooled(w)
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        and refusal("bfloat16", "cpu") is None
        and native.kernels() is not None
    )


def bounds(dim: int) -> tuple[float, float]:
    """(c1, c2) of `screen.cpp`'s bound |a_j - f_j| <= c1 (|a_j| + |b_j|) + c2 |x| |w_j| between
    a word's bfloat16 logit a_j (inputs rounded to bfloat16, exact products summed in float32,
    the sum rounded to bfloat16, the bias b_j added in float32) and any float32 dot product f_j
    of the same `dim` terms, whatever its order of summation. With u = 2^-8 (bfloat16's unit
    roundoff) and g = dim 2^-24 / (1 - dim 2^-24) (a float32 sum of dim terms): rounding the
    inputs moves each product by at most (2u + u^2) |x_i w_ji|, summing moves the sum by at most
    g sum_i |x_i w_ji| (a float32 dot product as much again), and the last rounding by
    u / (1 - u) |a_j|; sum_i |x_i w_ji| <= |x| |w_j| (Cauchy-Schwarz). Widened by 1 % for the
    norms' own rounding and the comparisons'."""
    u = 2.0**-8
    g = dim * 2.0**-24 / (1 - dim * 2.0**-24)
    c1 = u / (1 - u)
    c2 = (2 * u + u * u) * (1 + g) + g * (1 + u) ** 2 + g
    return c1 * 1.01, c2 * 1.01


def first_best(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """values, ids [ranks, S]: each rank's best word of each row (the ranks' words in order) ->
    the best over the ranks: the largest value, the first NaN, a tie to the earlier rank."""
    best, out = values[0], ids[0]
    for v, i in zip(values[1:], ids[1:], strict=True):
        up = (v > best) | (v.isnan() & ~best.isnan())
        best, out = torch.where(up, v, best), torch.where(up, i, out)
    return out
