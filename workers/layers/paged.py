"""Decode attention read straight out of the paged KV cache.

Eager PyTorch has no attention over paged keys: the eager path (`Attention.decode`) gathers each
sequence's blocks into one buffer and calls SDPA, so every key is read, written and read again.
Two kernels read each key once from its block, in the cache's own dtype, accumulating in float32:
- on CPU, `paged_decode.cpp`, built for this machine on first use with the other C++ kernels
  (`workers.layers.native`) and cached: it walks each sequence's cache slots front to back for
  all heads at once, prefetching ahead across its scattered blocks, in whole vectors for head
  sizes of 16 to 128. Measured on 2 cores of an AVX-512 CPU (128 sequences of 200 keys, a layer
  of 8 x 64 heads): 2.5x the inductor kernel below in float32 and 5x in bfloat16 (with 2 KV
  heads: 3.3x and 2x), which was itself 1.4x gather + SDPA (docs/performance.md);
- elsewhere (CUDA), `paged_decode` below compiled by torch.compile, which is also the CPU's
  fallback should the build fail (logged).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from workers.layers import native


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    blocks: torch.Tensor,
    lens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, kv_heads, rep, d]: one token per sequence, the query heads of each KV head as its
    rows; caches [num_blocks, block_size, kv_heads, d]; blocks [n, m] each sequence's blocks
    (padding: any valid block id); lens [n] its keys. -> (attention [n, kv_heads, rep, d] in q's
    dtype, its log-sum-exp [n, kv_heads, rep] in float32, to merge with other keys' parts)."""
    n, m = blocks.shape
    block_size = k_cache.shape[1]
    # [n, m, block_size, kv_heads, d]: indexing the cache that inductor folds into the loops
    k, v = k_cache[blocks].float(), v_cache[blocks].float()
    s = (q.float()[:, None, None] * k[..., None, :]).sum(-1) * q.shape[-1] ** -0.5
    pos = torch.arange(m * block_size, device=q.device).view(1, m, block_size, 1, 1)
    s = s.masked_fill(pos >= lens.view(-1, 1, 1, 1, 1), float("-inf"))
    top = s.amax((1, 2))
    p = (s - top[:, None, None]).exp()
    z = p.sum((1, 2))
    out = (p[..., None] * v[..., None, :]).sum((1, 2)) / z[..., None]
    return out.to(q.dtype), top + z.log()


class PagedDecode:
    """Decode attention over the paged cache: the C++ kernel for a CPU cache of float32 or
    bfloat16 (unless `build` is false, as tests comparing the two ask), else `paged_decode`
    compiled once per process. The C++ kernel is built (or loaded) here; `warm` compiles the other
    before the worker says it is ready.
    Compiled inputs are padded to at least two sequences of two blocks: torch.compile specialises
    sizes 0 and 1, and each would be a compile of its own."""

    def __init__(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        build: bool = True,
    ) -> None:
        self.native: Callable | None = None
        if build and torch.device(device).type == "cpu" and dtype in native.DTYPES:
            module = native.kernels()
            self.native = module.paged_decode if module is not None else None
        self.fn = None if self.native else torch.compile(paged_decode, dynamic=True)

    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        blocks: torch.Tensor,
        lens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.native is not None:
            return self.native(q, k_cache, v_cache, blocks, lens)
        n, m = blocks.shape
        if n >= 2 and m >= 2:
            return self.fn(q, k_cache, v_cache, blocks, lens)
        blocks = F.pad(blocks, (0, max(0, 2 - m), 0, max(0, 2 - n)))  # block 0, masked out
        lens = F.pad(lens, (0, max(0, 2 - n)), value=1)
        q = torch.cat([q, q[:1].expand(max(0, 2 - n), *q.shape[1:])])
        out, lse = self.fn(q, k_cache, v_cache, blocks, lens)
        return out[:n], lse[:n]

    @torch.inference_mode()  # as the runner's forward: grad mode is part of what is compiled
    def warm(self, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int) -> None:
        """Compile now, on the real caches, for `heads` query heads. The sizes differ from one
        another (and from the cache's): torch.compile would otherwise guard on their equality."""
        kv_heads, d = k_cache.shape[2:]
        like = {"dtype": torch.int64, "device": k_cache.device}
        q = torch.zeros(
            3, kv_heads, heads // kv_heads, d, dtype=k_cache.dtype, device=k_cache.device
        )
        self(q, k_cache, v_cache, torch.zeros(3, 5, **like), torch.ones(3, **like))
