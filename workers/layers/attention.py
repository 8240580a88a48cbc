"""Attention over packed sequences: bidirectional for encoders, causal over a paged KV cache for
decoders. The metadata (`Context`) is built once per forward by the runner and read by every
layer; no token ever attends across a sequence boundary and nothing is padded to a batch's longest
(except in the encoder's `padded` comparison mode).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from workers import packing
from workers.layers.linear import QKVParallelLinear, RowParallelLinear
from workers.layers.paged import PagedDecode
from workers.layers.parallel import TPGroup
from workers.layers.rotary import Rotary


@dataclass(slots=True)
class Prefill:
    """One sequence computing several tokens: rows [start, start + q) of the batch; its keys
    are the first `ctx` slots of its cache blocks `blocks`, or None when they are exactly its new
    tokens (nothing cached before: plain causal attention on them)."""

    start: int
    q: int
    ctx: int
    blocks: torch.Tensor | None
    mask: torch.Tensor | None  # [q, ctx], True where query i may see key j


@dataclass(slots=True)
class Decodes:
    """Sequences computing one token each, attended in one call over their keys, read block by
    block into one buffer (the last block of each, and the rows past the longest, padding).

    With `prefix`, the group's sequences share those leading cache blocks (prefix sharing):
    every query of the group attends to them in one dense call that reads them once (cascade
    attention), `blocks` are each sequence's blocks after them, and the two partial results are
    merged by their log-sum-exp."""

    rows: torch.Tensor  # [n] batch rows of their tokens
    blocks: torch.Tensor  # [n, max_blocks] their cache blocks (padding points at block 0)
    mask: torch.Tensor  # [n, 1, 1, max_blocks * block_size] True where the key is real
    lens: torch.Tensor  # [n] keys of each (in `blocks`)
    prefix: torch.Tensor | None = None  # [p] cache blocks every sequence of the group starts with
    bias: torch.Tensor | None = None  # `mask` as an additive float mask, made on first use


class Workspace:
    """One reusable buffer for the K/V a layer reads out of the paged cache. Every layer of a
    stage runs in turn, so one buffer serves them all; reusing it spares the page faults of a
    fresh multi-megabyte allocation per layer per step, which cost several times the copy."""

    def __init__(self) -> None:
        self.buf = torch.empty(0)

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        if self.buf.numel() < n or self.buf.dtype != like.dtype or self.buf.device != like.device:
            self.buf = torch.empty(n, dtype=like.dtype, device=like.device)
        return self.buf[:n].view(shape)


@dataclass(slots=True)
class Context:
    """How to run attention for one forward of one micro-batch."""

    seq_lens: list[int]  # tokens of each sequence in this forward
    positions: torch.Tensor  # [T] each token's position in its sequence
    causal: bool = False
    # encoders, packed: for the C++ kernel, each sequence's first row in the batch and its
    # length [n] (int64, CPU); for torch's flash kernel, (count, length, token rows
    # [count*length]) per distinct length, made on first use (`by_length`)
    starts: torch.Tensor | None = None
    lens: torch.Tensor | None = None
    groups: list[tuple[int, int, torch.Tensor]] | None = None
    # encoders on CUDA: each sequence's first row, and the end, [n + 1] on the device (torch's
    # jagged layout), made on first use (`jagged`)
    offsets: torch.Tensor | None = None
    # encoders, padded comparison mode: [n, 1, 1, max_len] True where the key is a real token
    key_mask: torch.Tensor | None = None
    # decoders
    slot_mapping: torch.Tensor | None = None  # [T] cache slot of each new token
    prefills: list[Prefill] = field(default_factory=list)
    decodes: list[Decodes] = field(default_factory=list)

    @property
    def padded(self) -> bool:
        return self.key_mask is not None

    @staticmethod
    def encoder(seq_lens: list[int], padded: bool, device: torch.device) -> Context:
        positions = packing.positions(seq_lens, device)
        if padded:
            mask = packing.mask(seq_lens, device)[:, None, None, :]
            return Context(seq_lens, positions, key_mask=mask)
        starts = torch.tensor(packing.offsets(seq_lens)[:-1], dtype=torch.int64)
        lens = torch.tensor(seq_lens, dtype=torch.int64)
        return Context(seq_lens, positions, starts=starts, lens=lens)

    def by_length(self) -> list[tuple[int, int, torch.Tensor]]:
        """The encoder's sequences grouped by length: (count, length, their rows), made once."""
        if self.groups is None:
            rows: dict[int, list[int]] = {}
            for start, length in zip(self.starts.tolist(), self.seq_lens, strict=True):
                rows.setdefault(length, []).append(start)
            device = self.positions.device
            self.groups = [
                (len(r), n, (torch.tensor(r)[:, None] + torch.arange(n)).flatten().to(device))
                for n, r in rows.items()
            ]
        return self.groups

    def jagged(self) -> torch.Tensor:
        """The encoder's sequence offsets on the device, made once for every layer."""
        if self.offsets is None:
            rows = packing.offsets(self.seq_lens)
            self.offsets = torch.tensor(rows, dtype=torch.int64).to(self.positions.device)
        return self.offsets

    @staticmethod
    def decoder(
        seq_lens: list[int],
        context_lens: list[int],
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        block_size: int,
        device: torch.device,
        by_length: bool = True,
    ) -> Context:
        """Sequence i computes its tokens at positions context_lens[i] - seq_lens[i] ..
        context_lens[i] - 1; its keys are the first context_lens[i] slots of its blocks.
        `by_length`: decodes in groups of similar context length (`_by_length`), for attention
        that reads each group's keys padded to its longest; false, for a kernel that reads each
        sequence's own length (the C++ one), one group of all that share a prefix (and one of
        those that share none), in the batch's order: a call, a gather of queries and a write
        of outputs a group and layer were 6-7 % of a 128-sequence decode step."""
        split = _by_length if by_length else _whole
        starts = packing.offsets(seq_lens)
        # one tensor from plain ints: an arange per sequence was ~0.5 ms of a 128-sequence step
        pos = [p for q, c in zip(seq_lens, context_lens, strict=True) for p in range(c - q, c)]
        positions = torch.tensor(pos, dtype=torch.int64).to(device)
        tables = block_tables.to(device=device, dtype=torch.int64)

        # Rows that query one token each: decodes, and the rows of a short prompt after cached
        # blocks that other sequences share (a common prefix): row r of such a prompt is a
        # decode of context c - q + r + 1, so the prefix is read once for the whole group and
        # attended in one dense call (cascade), as decodes' is. Per prompt, a gather and SDPA
        # with a mask were ~60 % of a step of 64 prompts of 20 tokens after a 384-token prefix.
        first = block_tables[:, 0].tolist()
        sharing = Counter(first)
        prefills, src, row_ctx, row_start = [], [], [], []
        for i, (q, c) in enumerate(zip(seq_lens, context_lens, strict=True)):
            if q == 1 and c > 1:
                src.append(i)
                row_ctx.append(c)
                row_start.append(starts[i])
            elif q == c:
                prefills.append(Prefill(starts[i], q, c, None, None))
            elif q <= ROWS_AS_DECODES and sharing[first[i]] > 1:
                src += [i] * q
                row_ctx += range(c - q + 1, c + 1)
                row_start += range(starts[i], starts[i] + q)
            else:
                qpos = torch.arange(c - q, c, device=device)
                mask = torch.arange(c, device=device)[None, :] <= qpos[:, None]
                blocks = tables[i, : -(-c // block_size)]
                prefills.append(Prefill(starts[i], q, c, blocks, mask))
        decodes = []
        ids = list(range(len(src)))
        if src != ids:  # each row its sequence's table
            tables, block_tables = tables[src], block_tables[src]
        shared, alone = _by_prefix(ids, block_tables, row_ctx, block_size)
        for group, p in shared:
            suffix = {i: row_ctx[i] - p * block_size for i in group}
            prefix = tables[group[0], :p]
            for sub in split(group, suffix):
                decodes.append(_decodes(sub, suffix, tables[:, p:], row_start, block_size, prefix))
        for group in split(alone, row_ctx):
            decodes.append(_decodes(group, row_ctx, tables, row_start, block_size))
        return Context(
            seq_lens,
            positions,
            causal=True,
            slot_mapping=slot_mapping.to(device=device, dtype=torch.int64),
            prefills=prefills,
            decodes=decodes,
        )


# A prompt after shared cached blocks with at most this many new tokens is attended as that many
# decodes (above); a longer one keeps its own call, which reads its keys once for all its rows.
ROWS_AS_DECODES = 64

# Decodes are attended in groups of similar context length: each group reads (and attends over)
# its keys padded to its own longest, so a short sequence does not pay for the longest in the
# batch. A group closes when the next length exceeds its shortest by this factor, once it holds
# MIN_GROUP sequences (fewer calls matter more than padding for small groups).
GROUP_SPREAD = 1.5
MIN_GROUP = 8


def _by_length(ids: list[int], context_lens: Mapping[int, int] | list[int]) -> list[list[int]]:
    groups: list[list[int]] = []
    for i in sorted(ids, key=lambda i: context_lens[i]):
        g = groups[-1] if groups else None
        if g is None or (
            len(g) >= MIN_GROUP and context_lens[i] > GROUP_SPREAD * context_lens[g[0]]
        ):
            groups.append([i])
        else:
            g.append(i)
    return groups


def _whole(ids: list[int], context_lens: Mapping[int, int] | list[int]) -> list[list[int]]:
    # in the batch's order, not by length: the C++ kernel splits its sequences between threads
    # in contiguous runs, and sorted, one thread would get all the longest
    return [list(ids)] if ids else []


def _by_prefix(
    ids: list[int], tables: torch.Tensor, context_lens: list[int], block_size: int
) -> tuple[list[tuple[list[int], int]], list[int]]:
    """Decoding sequences that start with the same cache blocks (prefix sharing gave them the
    same block ids): (group, number of shared blocks) for each group of two or more, and the
    sequences that share nothing. A group's shared blocks stop short of every member's last
    token, so each member keeps a key of its own after them."""
    by_first: dict[int, list[int]] = {}
    for i, block in zip(ids, tables[ids, 0].tolist() if ids else [], strict=True):
        by_first.setdefault(block, []).append(i)
    shared, alone = [], []
    for group in by_first.values():
        p = 0
        if len(group) > 1:
            t = tables[group]
            p = int((t == t[0]).all(0).cumprod(0).sum())
            p = min([p] + [(context_lens[i] - 1) // block_size for i in group])
        if p:
            shared.append((group, p))
        else:
            alone.extend(group)
    return shared, alone


def _decodes(
    group: list[int],
    context_lens: Mapping[int, int] | list[int],
    tables: torch.Tensor,
    starts: list[int],
    block_size: int,
    prefix: torch.Tensor | None = None,
) -> Decodes:
    device = tables.device
    ctx = torch.tensor([context_lens[i] for i in group], device=device)
    width = -(-int(ctx.max()) // block_size)
    blocks = tables[group][:, :width].clamp(min=0)
    real = torch.arange(width * block_size, device=device)[None, :] < ctx[:, None]
    rows = torch.tensor([starts[i] for i in group], device=device)
    return Decodes(rows, blocks, real[:, None, None, :], ctx, prefix)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its log-sum-exp, to merge partial results: q [n, h, r, d] against k, v
    [n, h, L, d], `bias` an additive mask broadcast to [n, h, r, L] -> ([n, h, r, d], float32
    [n, h, r]). On CPU, torch's flash kernel returns both; elsewhere the plain math does."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias
        )
    s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if bias is not None:
        s = s + bias
    lse = s.logsumexp(-1)
    return (s - lse[..., None]).exp().to(q.dtype) @ v, lse


class Attention(nn.Module):
    """Scaled dot-product attention of this rank's heads. q [T, heads, d], k and v
    [T, kv_heads, d] -> [T, heads, d]. A decoder's layer writes its new K/V into its cache
    (`k_cache`, `v_cache`: [slots, kv_heads, d], given by the runner) before attending."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.k_cache = self.v_cache = torch.empty(0)
        self.block_size = 0
        self.workspace = Workspace()  # the runner gives every layer of a stage the same one
        self.kernel: PagedDecode | None = None  # compiled decode attention, when the runner has it
        # the C++ packed attention (native.py), when the runner has it: an encoder's texts, a
        # decoder's fresh prompts (q, k, v, starts, lens, causal)
        self.packed: Callable[..., torch.Tensor] | None = None

    def read(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `blocks` [n, m] out of the cache: [n, m * block_size, kv_heads, d] each."""
        n, m = blocks.shape
        shape = (2, n * m, self.block_size, self.kv_heads, self.head_dim)
        out = self.workspace.take(shape, self.k_cache)
        flat = blocks.flatten()
        for cache, dest in zip((self.k_cache, self.v_cache), out, strict=True):
            by_block = cache.view(-1, self.block_size, self.kv_heads, self.head_dim)
            torch.index_select(by_block, 0, flat, out=dest)
        k, v = out.view(2, n, m * self.block_size, self.kv_heads, self.head_dim)
        return k, v

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context
    ) -> torch.Tensor:
        if not ctx.causal:
            if ctx.padded:
                return _padded(q, k, v, ctx)
            if self.packed is not None:
                return self.packed(q, k, v, ctx.starts, ctx.lens)
            if q.device.type == "cuda":
                return jagged(q, k, v, ctx.jagged())
            return _packed(q, k, v, ctx)
        if self.k_cache.numel():
            self.k_cache.index_copy_(0, ctx.slot_mapping, k)
            self.v_cache.index_copy_(0, ctx.slot_mapping, v)
        gqa = self.heads != self.kv_heads
        prefills = ctx.prefills
        fresh = [p for p in prefills if p.blocks is None] if self.packed is not None else []
        if fresh:
            # the prompts with nothing cached before them in one call, causal; the rest of the
            # rows are written below
            starts = torch.tensor([p.start for p in fresh])
            out = self.packed(q, k, v, starts, torch.tensor([p.q for p in fresh]), True)
            prefills = [p for p in prefills if p.blocks is not None]
        else:
            out = torch.empty_like(q)
        if q.device.type == "cuda" and not gqa:
            prefills = self._fresh(q, k, v, prefills, out)
        for p in prefills:
            rows = slice(p.start, p.start + p.q)
            qs = q[rows].transpose(0, 1)[None]
            if p.blocks is None:
                ks, vs = (t[rows].transpose(0, 1)[None] for t in (k, v))
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
            else:
                ks, vs = (t[0, : p.ctx].transpose(0, 1)[None] for t in self.read(p.blocks[None]))
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=p.mask, enable_gqa=gqa)
            out[rows] = o[0].transpose(0, 1)
        for d in ctx.decodes:
            out[d.rows] = self.decode(q[d.rows], d)
        return out

    def _fresh(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        prefills: list[Prefill],
        out: torch.Tensor,
    ) -> list[Prefill]:
        """The prefills with nothing cached before them (each attends causally to its own new
        tokens) in one jagged call, written into `out`; the others, left to do."""
        fresh = [p for p in prefills if p.blocks is None]
        if len(fresh) < 2:
            return prefills
        rows = torch.cat([torch.arange(p.start, p.start + p.q) for p in fresh]).to(q.device)
        offsets = torch.tensor(packing.offsets([p.q for p in fresh]), dtype=torch.int64)
        o = jagged(*(t.index_select(0, rows) for t in (q, k, v)), offsets.to(q.device), True)
        out.index_copy_(0, rows, o)
        return [p for p in prefills if p.blocks is not None]

    def decode(self, q: torch.Tensor, d: Decodes) -> torch.Tensor:
        """q [n, heads, d] -> [n, heads, d]. The query heads that share a KV head stand as that
        head's query rows ([n, kv_heads, rep, d]): grouped-query attention without copying K/V."""
        n, heads, dim = q.shape
        qs = q.view(n, self.kv_heads, heads // self.kv_heads, dim)
        if self.kernel is not None:
            caches = (
                c.view(-1, self.block_size, self.kv_heads, dim)
                for c in (self.k_cache, self.v_cache)
            )
            own, own_lse = self.kernel(qs, *caches, d.blocks, d.lens)
        else:
            ks, vs = (t.transpose(1, 2) for t in self.read(d.blocks))
            if d.prefix is None:
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=d.mask)
                return o.reshape(n, heads, dim)
            if d.bias is None:
                d.bias = torch.zeros(d.mask.shape, dtype=q.dtype, device=q.device)
                d.bias.masked_fill_(~d.mask, float("-inf"))
            own, own_lse = _attend(qs, ks, vs, d.bias)  # before the next read reuses the buffer
        if d.prefix is None:
            return own.reshape(n, heads, dim)
        # the shared blocks, once for the whole group: [1, kv_heads, n * rep, d] against them
        kp, vp = (t.transpose(1, 2) for t in self.read(d.prefix[None]))
        qp = qs.transpose(0, 1).reshape(1, self.kv_heads, -1, dim)
        pre, pre_lse = _attend(qp, kp, vp)
        pre = pre.view(self.kv_heads, n, -1, dim).transpose(0, 1)
        pre_lse = pre_lse.view(self.kv_heads, n, -1).transpose(0, 1)
        lse = torch.logaddexp(own_lse, pre_lse)
        o = own * (own_lse - lse).exp()[..., None] + pre * (pre_lse - lse).exp()[..., None]
        return o.to(q.dtype).reshape(n, heads, dim)


def jagged(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, causal: bool = False
) -> torch.Tensor:
    """Every packed sequence in one call: q, k, v [T, heads, d] seen as nested jagged tensors
    [n, heads, length, d] split at `offsets` [n + 1]; on CUDA torch runs its varlen flash
    (half precision) or memory-efficient kernel over them, one launch a layer, where a call per
    distinct length would launch hundreds. (torch's CPU fallback for jagged inputs has no
    causal mode: CUDA only, for decoders.)"""
    qn, kn, vn = (
        torch.nested.nested_tensor_from_jagged(t.contiguous(), offsets).transpose(1, 2)
        for t in (q, k, v)
    )
    o = F.scaled_dot_product_attention(qn, kn, vn, is_causal=causal)
    return o.transpose(1, 2).values()


def _packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context) -> torch.Tensor:
    out = torch.empty_like(q)
    heads, d = q.shape[1:]
    for count, length, index in ctx.by_length():
        # Gather equal-length sequences into [count, heads, length, d]: a dense batch
        # with no padding, since every member has the same length.
        qg, kg, vg = (
            t.index_select(0, index).view(count, length, heads, d).transpose(1, 2)
            for t in (q, k, v)
        )
        o = F.scaled_dot_product_attention(qg, kg, vg)
        out.index_copy_(0, index, o.transpose(1, 2).reshape(count * length, heads, d))
    return out


def _padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context) -> torch.Tensor:
    """q, k, v [n, max_len, heads, d] -> same shape; padded keys are masked out."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.key_mask)
    return o.transpose(1, 2)


class SelfAttention(nn.Module):
    """Every family's attention block: the fused QKV projection (split by heads), rotary
    positions when the model has them, attention of this rank's heads, and the output
    projection summed over ranks."""

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        tp: TPGroup,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        rotary: Rotary | None = None,
    ) -> None:
        super().__init__()
        self.qkv = QKVParallelLinear(
            hidden, head_dim, num_heads, num_kv_heads, tp, bias=bias, dtype=dtype
        )
        self.attn = Attention(self.qkv.heads, self.qkv.kv_heads, head_dim)
        self.out = RowParallelLinear(num_heads * head_dim, hidden, tp, bias=bias, dtype=dtype)
        # shared by every layer; a list keeps its tables out of this module's state
        self.rotary = [rotary] if rotary is not None else []

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        d = self.attn.head_dim
        q, k, v = (t.unflatten(-1, (-1, d)) for t in self.qkv(x))
        if self.rotary:
            q, k = self.rotary[0](ctx.positions, q, k)
        return self.out(self.attn(q, k, v, ctx).flatten(-2))
