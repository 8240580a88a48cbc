"""Decode attention over the paged KV cache against plain attention over each sequence's keys:
sequences grouped by length, and sequences that share leading blocks (prefix sharing) attended
in two parts (the shared blocks once for the group, then each one's own) merged by log-sum-exp."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.layers.attention import Attention, Context
from workers.layers.paged import PagedDecode

BLOCK = 4
DIM = 8


def paged(heads: int, kv_heads: int, slots: int) -> Attention:
    torch.manual_seed(0)
    attn = Attention(heads, kv_heads, DIM)
    attn.k_cache = torch.randn(slots, kv_heads, DIM)
    attn.v_cache = torch.randn(slots, kv_heads, DIM)
    attn.block_size = BLOCK
    return attn


def reference(attn: Attention, q: torch.Tensor, table: list[int], ctx: int) -> torch.Tensor:
    """q [heads, d] of the token at position ctx - 1 against the first ctx slots of `table`."""
    slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(ctx)])
    k, v = (c[slots].transpose(0, 1)[None] for c in (attn.k_cache, attn.v_cache))
    gqa = attn.heads != attn.kv_heads
    return F.scaled_dot_product_attention(q[None, :, None], k, v, enable_gqa=gqa)[0, :, 0]


@pytest.fixture(scope="module")
def native() -> PagedDecode:
    kernel = PagedDecode()  # built once for the machine, loaded once for the module
    assert kernel.native is not None, "the C++ kernel did not build (see the log)"
    return kernel


def test_a_build_lock_left_by_a_killed_builder_is_not_waited_on(native: PagedDecode) -> None:
    """torch's build lock is a plain file that a builder killed mid-build leaves behind; the next
    process must not wait on it for ever (it holds a lock that died with its holder instead)."""
    import subprocess
    import sys

    from workers.layers.native import build_directory

    leftover = build_directory() / "lock"
    leftover.touch()
    done = subprocess.run(
        [sys.executable, "-c", "from workers.layers.native import kernels; print(kernels())"],
        capture_output=True,
        text=True,
        timeout=240,  # a build, on a busy machine, at most; loading takes seconds
    )
    assert "baton_kernels_" in done.stdout, done.stderr[-2000:]
    assert not leftover.exists()


@pytest.fixture(scope="module")
def compiled() -> PagedDecode:
    return PagedDecode(build=False)  # compiled once for the module (sizes are dynamic)


@pytest.mark.parametrize(
    "kernel", [None, "native", "compiled"], ids=["gather", "native", "compiled"]
)
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("by_length", [True, False], ids=["by-length", "whole"])
def test_decode_with_and_without_shared_blocks(kv_heads, kernel, by_length, request):
    heads = 4
    attn = paged(heads, kv_heads, slots=64 * BLOCK)
    if kernel:
        attn.kernel = request.getfixturevalue(kernel)
    shared = [3, 9, 4]  # three full blocks every sequence of group one starts with
    tables = [
        shared + [10, 11],
        shared + [12],
        shared + [13, 14, 15],
        shared[:2] + [16, 17],  # shares only two of them
        [20, 21, 22],  # shares nothing
        [30],
    ]
    ctx = [19, 13, 23, 14, 9, 2]
    width = max(map(len, tables))
    block_tables = torch.full((len(tables), width), -1, dtype=torch.int32)
    for i, t in enumerate(tables):
        block_tables[i, : len(t)] = torch.tensor(t)
    slots = torch.tensor(
        [tables[i][(c - 1) // BLOCK] * BLOCK + (c - 1) % BLOCK for i, c in enumerate(ctx)]
    )
    context = Context.decoder(
        [1] * len(ctx), ctx, slots, block_tables, BLOCK, torch.device("cpu"), by_length
    )
    prefixes = sorted(len(d.prefix) for d in context.decodes if d.prefix is not None)
    assert prefixes == [2]  # the first four share two blocks (the fourth only two)
    assert sum(len(d.rows) for d in context.decodes) == len(ctx)
    if not by_length:  # the four sharing a prefix, the two sharing nothing: in batch order
        assert [d.rows.tolist() for d in context.decodes] == [[0, 1, 2, 3], [4, 5]]

    q = torch.randn(len(ctx), heads, DIM)
    k = attn.k_cache[slots].clone()  # the new tokens' K/V are already in place: rewritten as is
    v = attn.v_cache[slots].clone()
    out = attn(q, k, v, context)
    for i, (t, c) in enumerate(zip(tables, ctx, strict=True)):
        torch.testing.assert_close(out[i], reference(attn, q[i], t, c), atol=1e-5, rtol=1e-5)


def test_a_prefix_is_shared_only_up_to_each_members_last_token():
    # the second sequence's context ends inside the first one's third block: the group shares
    # the blocks before its last token only, so each member keeps a key of its own
    tables = torch.tensor([[1, 2, 3, 4], [1, 2, 3, -1]], dtype=torch.int32)
    ctx = [16, 9]
    context = Context.decoder(
        [1, 1], ctx, torch.tensor([63, 12]), tables, BLOCK, torch.device("cpu")
    )
    [decodes] = context.decodes
    assert decodes.prefix.tolist() == [1, 2]


@pytest.mark.parametrize("n,blocks", [(1, 1), (1, 3), (3, 1), (5, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["native", "compiled"])
@pytest.mark.parametrize("dim", [DIM, 64, 128])  # 64, 128: whole vectors in the C++ kernel
def test_kernels_read_the_paged_cache(which, n, blocks, dtype, dim, request):
    # compiled: one sequence or one block is padded to two (a size torch.compile does not
    # specialise on); native: few sequences are split by KV head, many are taken whole
    kernel = request.getfixturevalue(which)
    torch.manual_seed(1)
    kv_heads, rep = 2, 3
    k_cache, v_cache = (torch.randn(20, BLOCK, kv_heads, dim).to(dtype) for _ in range(2))
    q = torch.randn(n, kv_heads, rep, dim).to(dtype)
    table = torch.randperm(20)[: n * blocks].view(n, blocks)
    lens = torch.randint(1, blocks * BLOCK + 1, (n,))
    out, lse = kernel(q, k_cache, v_cache, table, lens)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == q.shape[:3]
    for i in range(n):
        k, v = (
            c[table[i]].flatten(0, 1)[: lens[i]].float().transpose(0, 1) for c in (k_cache, v_cache)
        )
        s = q[i].float() @ k.transpose(-1, -2) * dim**-0.5
        torch.testing.assert_close(lse[i], s.logsumexp(-1), atol=1e-4, rtol=1e-4)
        want = (s.softmax(-1) @ v).to(dtype).float()
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16 keeps 8 bits of mantissa
        torch.testing.assert_close(out[i].float(), want, atol=tol, rtol=tol)
