"""Tensor-parallel linear layers: each rank allocates and loads only its own shard.

Every parameter carries a `weight_loader(param, view, shard_id)` that reads its rank's rows or
columns from a checkpoint `View` (workers/loader.py), nano-vllm style. Once loaded, on CPU, each
weight moves into oneDNN's blocked layout (`Packed.pack`): torch's plain CPU GEMM ran the
layers at 210 GFLOP/s on 2 cores of an AVX-512 EPYC, oneDNN on the packed weight at 500
(docs/performance.md).
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.backends import mkldnn

from workers.layers import native
from workers.layers.activation import POST_OPS, activation
from workers.layers.parallel import TPGroup
from workers.loader import View, divide
from workers.pool import pooled
from workers.precision import cpu_flags


def param(*shape: int, dtype: torch.dtype | None, loader=None) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    if loader is not None:
        p.weight_loader = loader
    return p


def packable(dtype: torch.dtype) -> bool:
    """oneDNN packs float32 everywhere, bfloat16 only where it computes it (AVX-512 BF16, AMX;
    elsewhere the plain path stays, as `baton up` refuses bfloat16 there anyway)."""
    if not mkldnn.is_available():
        return False
    return dtype == torch.float32 or (
        dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


@functools.cache
def amx() -> bool:
    return "amx_bf16" in cpu_flags()


def rows_for(rows: int) -> int:
    """The row count a matmul of `rows` runs at, so that oneDNN meets the same few sizes again:
    above 16, a multiple of 16 (AMX's tile height), and from 256 on one of 16 sizes an octave
    (at most 1/16 more rows)."""
    if rows <= 16:
        return rows
    step = 1 << max(4, rows.bit_length() - 5)
    return -(-rows // step) * step


@functools.cache
def layout_of(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, torch.Tensor]:
    """oneDNN's packed layout of a weight of this shape here: its bytes, and its descriptor
    (serialized, what `mkldnn_view` takes)."""
    p = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(shape, dtype=dtype))
    return torch.ops.mkldnn._nbytes(p), torch.ops.mkldnn._get_mkldnn_serialized_md(p)


def packs_in_place(w: torch.Tensor) -> bool:
    """Whether a pooled weight can lie in the pool in oneDNN's layout: a CPU weight oneDNN
    packs, whose packed bytes take exactly its plain ones' room (no padding; an LM head of an
    odd vocabulary has some), with the kernels here to make views over them."""
    return (
        w.device.type == "cpu"
        and packable(w.dtype)
        and native.kernels() is not None
        and layout_of(tuple(w.shape), w.dtype)[0] == w.nbytes
    )


class Packed(nn.Module):
    """y = x W^T (+ b) for a layer whose `weight` is [out, in]: from a copy of W in oneDNN's
    blocked layout once `pack` has run (CPU, float32 or bfloat16), else the plain GEMM."""

    weight: nn.Parameter | None
    packed: torch.Tensor | None = None
    # a pooled weight: given to oneDNN in its plain layout wherever it lies now (in the pool's
    # shared memory, or in a prefetch buffer), with bitwise the packed layout's results
    plain: bool = False
    # a pooled weight whose bytes are oneDNN's layout (written so by the worker that filled
    # the pool: `pack_pooled`), given to oneDNN as a view over wherever they lie now, one view
    # per place (the pool, each prefetch buffer)
    in_pool: bool = False
    views: dict[int, torch.Tensor] | None = None
    # On AMX, oneDNN compiles a bfloat16 matmul for each row count it meets, at about 5 ms
    # (one of GPT-2's projections then runs 300 rows in 0.7 ms), and a generation step has a
    # row count of its own at nearly every step: such layers run at `rows_for`'s sizes
    # (docs/performance.md, "Row counts on AMX")
    round_rows: bool = False

    def pack(self, pool_packed: bool = False) -> None:
        """Once loaded: reorder the weight for oneDNN, once (one packing serves every batch
        size); the packed copy replaces the plain one, so the weight's bytes exist once. A
        pooled weight stays where it lies: packed there where the pool holds packed weights
        (`pool_packed`) and it can be, else plain."""
        w = self.weight
        if w is None or w.device.type != "cpu" or not packable(w.dtype):
            return
        self.round_rows = w.dtype == torch.bfloat16 and amx()
        if pooled(w):
            # oneDNN runs the plain layout (measured): bitwise the packed one's results, at
            # 90-100 % of its speed for 4,096 rows, 45-90 % for decode's few
            if pool_packed and packs_in_place(w):
                self.in_pool, self.views = True, {}
            else:
                self.plain = True
            return
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach())
        self.weight = None

    def pack_pooled(self) -> None:
        """Write the pooled weight's oneDNN layout over its plain bytes in the pool: by the
        worker that fills the pool, under the shard's lock, before the others read it."""
        w = self.weight
        assert w is not None and pooled(w) and packs_in_place(w)
        p = torch.ops.mkldnn._reorder_linear_weight(w.detach())
        ctypes.memmove(w.data_ptr(), torch.ops.mkldnn.data_ptr(p), w.nbytes)

    def _view(self) -> torch.Tensor:
        w, views = self.weight, self.views
        assert w is not None and views is not None
        view = views.get(w.data_ptr())
        if view is None:
            kernels = native.kernels()
            assert kernels is not None  # `packs_in_place` built them
            md = layout_of(tuple(w.shape), w.dtype)[1]
            view = views[w.data_ptr()] = kernels.mkldnn_view(
                w.data_ptr(), list(w.shape), w.dtype, md
            )
        return view

    def linear(
        self, x: torch.Tensor, bias: torch.Tensor | None, act: str | None = None
    ) -> torch.Tensor:
        """x W^T + b, then the activation named `act` (HF's names), if any: fused into the
        packed matmul where oneDNN has it as a post-op."""
        w = self._view() if self.in_pool else self.weight if self.plain else self.packed
        if w is None:
            y = F.linear(x, self.weight, bias)
        elif act in POST_OPS:
            return onednn(x, w, bias, self.round_rows, POST_OPS[act])
        else:
            y = onednn(x, w, bias, self.round_rows)
        return y if act is None else activation(act)(y)


def onednn(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    round_rows: bool,
    post: tuple[str, str] = ("none", ""),
) -> torch.Tensor:
    """x w^T + b by oneDNN, on a weight in its blocked layout (or a plain one), with a fused
    post-op (algorithm, approximation); at `rows_for`'s row count where `round_rows` (zero rows
    after the real ones: each output row reads only its own input row)."""
    rows = x.shape[0]
    x = padded(x) if round_rows and x.dim() == 2 else x
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, post[0], [], post[1])[:rows]


def padded(x: torch.Tensor, zero: int = 0) -> torch.Tensor:
    """x [rows, k] with rows of `zero` (what stands for 0 in x's encoding) after its own, to
    `rows_for`'s count (each output row of a matmul reads only its own input row)."""
    n = rows_for(x.shape[0])
    return x if n == x.shape[0] else torch.cat([x, x.new_full((n - x.shape[0], x.shape[1]), zero)])


class ColumnParallelLinear(Packed):
    """y = x W^T + b with W's output rows split across ranks; the output stays sharded."""

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
        self.out_local = divide(out_features, tp.size, "out_features")
        self.weight = param(self.out_local, in_features, dtype=dtype, loader=self.weight_loader)
        self.bias = param(self.out_local, dtype=dtype, loader=self.weight_loader) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.bias)

    def weight_loader(self, p: nn.Parameter, view: View, shard_id: object = None) -> None:
        p.copy_(view.shard(0, self.tp.rank, self.tp.size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (SwiGLU's gate and
    up); checkpoint part `shard_id` fills the shard_id-th block of this rank's rows."""

    def __init__(
        self,
        in_features: int,
        out_features: list[int],
        tp: TPGroup,
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.sizes = [divide(n, tp.size, "out_features") for n in out_features]
        super().__init__(in_features, sum(out_features), tp, bias, dtype)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.linear(x, self.bias).split(self.sizes, dim=-1))

    def weight_loader(self, p: nn.Parameter, view: View, shard_id: object = None) -> None:
        part = int(shard_id)  # type: ignore[arg-type]
        start = sum(self.sizes[:part])
        p[start : start + self.sizes[part]].copy_(view.shard(0, self.tp.rank, self.tp.size))


class QKVParallelLinear(Packed):
    """Query, key and value projections in one matmul, split across ranks by whole heads.

    Query heads split evenly. Key/value heads split too when there are at least as many as
    ranks; otherwise each is replicated on the tp / num_kv_heads ranks whose query heads use it
    (grouped-query attention). Checkpoints store q, k, v as separate tensors (shard ids "q",
    "k", "v") or fused in that order (shard id "qkv", as GPT-2 and BERT's fused exports do).
    """

    def __init__(
        self,
        hidden: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        tp: TPGroup,
        bias: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.tp, self.head_dim = tp, head_dim
        self.total_heads, self.total_kv_heads = num_heads, num_kv_heads
        self.heads = divide(num_heads, tp.size, "num_heads")
        if num_kv_heads >= tp.size:
            self.kv_heads = divide(num_kv_heads, tp.size, "num_kv_heads")
            self.kv_first = tp.rank * self.kv_heads
        else:
            divide(tp.size, num_kv_heads, "with fewer KV heads than ranks, the rank count")
            self.kv_heads = 1
            self.kv_first = tp.rank * num_kv_heads // tp.size
        self.q_size, self.kv_size = self.heads * head_dim, self.kv_heads * head_dim
        rows = self.q_size + 2 * self.kv_size
        self.weight = param(rows, hidden, dtype=dtype, loader=self.weight_loader)
        self.bias = param(rows, dtype=dtype, loader=self.weight_loader) if bias else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.linear(x, self.bias).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return q, k, v

    def _rows(self, part: str) -> tuple[int, int, int]:
        """(where in this parameter, where in the full part's rows, how many) for a part."""
        d = self.head_dim
        if part == "q":
            return 0, self.tp.rank * self.q_size, self.q_size
        here = self.q_size if part == "k" else self.q_size + self.kv_size
        return here, self.kv_first * d, self.kv_size

    def weight_loader(self, p: nn.Parameter, view: View, shard_id: object = None) -> None:
        fused = {"q": 0, "k": self.total_heads, "v": self.total_heads + self.total_kv_heads}
        for part in ("q", "k", "v") if shard_id == "qkv" else (str(shard_id),):
            here, there, n = self._rows(part)
            if shard_id == "qkv":
                there += fused[part] * self.head_dim
            p[here : here + n].copy_(view.read(0, there, n))


class RowParallelLinear(Packed):
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
        self.in_local = divide(in_features, tp.size, "in_features")
        self.weight = param(out_features, self.in_local, dtype=dtype, loader=self.weight_loader)
        self.bias = param(out_features, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:  # nothing to sum: the bias rides in the matmul, not a pass of its own
            return self.linear(x, self.bias)
        y = self.tp.all_reduce(self.linear(x, None))
        # The bias is replicated, so add it after the sum or it would count tp.size times.
        return y + self.bias if self.bias is not None else y

    def weight_loader(self, p: nn.Parameter, view: View, shard_id: object = None) -> None:
        p.copy_(view.shard(1, self.tp.rank, self.tp.size))
