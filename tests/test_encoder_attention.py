"""Encoder attention over packed sequences by the C++ kernel against torch's attention over each
sequence alone: float32 and bfloat16, every head size it takes, lengths around its tiles (16 keys,
8/4/2 query rows), q/k/v as the strided views a fused QKV projection gives. Also the one-call
jagged path CUDA takes (here on the CPU, where torch computes it another way: the same
attention, so its indexing is what is tested), bidirectional and, for decoders' fresh prefills,
causal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers import packing
from workers.layers import attention, native
from workers.layers.attention import Attention, Context, Prefill, jagged

HEADS = 3


@pytest.fixture(scope="module")
def kernel():
    module = native.kernels()  # built once for the machine, loaded once for the module
    assert module is not None, "the C++ kernels did not build (see the log)"
    return module.packed_attention


def qkv(seq_lens: list[int], dim: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """q, k, v [T, HEADS, dim]: views into one [T, 3 * HEADS * dim] tensor, as the layer's."""
    torch.manual_seed(sum(seq_lens) + dim)
    fused = (torch.randn(sum(seq_lens), 3 * HEADS * dim) * 2).to(dtype)
    return [t.unflatten(-1, (HEADS, dim)) for t in fused.split(HEADS * dim, dim=-1)]


def reference(q, k, v, seq_lens: list[int]) -> torch.Tensor:
    out = []
    for a, b in zip(packing.offsets(seq_lens)[:-1], packing.offsets(seq_lens)[1:], strict=True):
        qs, ks, vs = (t[a:b].float().transpose(0, 1) for t in (q, k, v))
        out.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1))
    return torch.cat(out)


LENGTHS = {
    "one token": [1],
    "around a tile": [1, 2, 7, 8, 9, 15, 16, 17, 31, 33],
    "long and short": [300, 5, 64, 1, 129],
    "many": [(i * 37) % 90 + 1 for i in range(60)],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("dim", native.HEAD_DIMS)
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
def test_kernel_matches_attention_per_sequence(kernel, dtype, dim, lengths):
    q, k, v = qkv(lengths, dim, dtype)
    ctx = Context.encoder(lengths, False, torch.device("cpu"))
    got = kernel(q, k, v, ctx.starts, ctx.lens)
    assert got.dtype == dtype and got.shape == q.shape
    want = reference(q, k, v, lengths)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    else:  # the kernel computes in float32: what differs is the output's rounding to bfloat16
        torch.testing.assert_close(got, want.to(dtype), atol=1e-2, rtol=2**-7)


def causal_reference(q, k, v, seq_lens: list[int]) -> torch.Tensor:
    out = []
    for a, b in zip(packing.offsets(seq_lens)[:-1], packing.offsets(seq_lens)[1:], strict=True):
        qs, ks, vs = (t[a:b].float().transpose(0, 1) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        out.append(o.transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4], ids=["1 KV head", "2 KV heads", "4 KV heads"])
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
def test_kernel_is_causal_attention_with_grouped_heads(kernel, dtype, kv_heads, lengths):
    """A decoder's fresh prompts: each row sees its own sequence's keys up to itself; 4 query
    heads over 1, 2 or 4 KV heads, as rotary and the fused projection leave them."""
    torch.manual_seed(len(lengths) + kv_heads)
    n, dim = sum(lengths), 64
    q = (torch.randn(n, 4, dim) * 2).to(dtype)
    kv = (torch.randn(n, 2 * kv_heads * dim) * 2).to(dtype)
    k, v = (t.unflatten(-1, (kv_heads, dim)) for t in kv.split(kv_heads * dim, dim=-1))
    ctx = Context.encoder(lengths, False, torch.device("cpu"))
    got = kernel(q, k, v, ctx.starts, ctx.lens, True)
    want = causal_reference(q, k, v, lengths)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    else:
        torch.testing.assert_close(got, want.to(dtype), atol=1e-2, rtol=2**-7)


def test_layer_takes_the_kernel_or_flash_alike(kernel):
    lengths = LENGTHS["long and short"]
    q, k, v = qkv(lengths, 32, torch.float32)
    ctx = Context.encoder(lengths, False, torch.device("cpu"))
    attn = Attention(HEADS, HEADS, 32)
    flash = attn(q, k, v, ctx)
    attn.packed = kernel
    torch.testing.assert_close(attn(q, k, v, ctx), flash, atol=2e-5, rtol=1e-4)


def test_kernel_refuses_what_it_cannot_compute(kernel):
    lengths = [3, 4]
    ctx = Context.encoder(lengths, False, torch.device("cpu"))
    q, k, v = qkv(lengths, 48, torch.float32)
    with pytest.raises(RuntimeError, match="head size"):
        kernel(q, k, v, ctx.starts, ctx.lens)
    q, k, v = qkv(lengths, 32, torch.float32)
    with pytest.raises(RuntimeError, match="dtype"):
        kernel(q, k.double(), v, ctx.starts, ctx.lens)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel(q.transpose(0, 1).contiguous().transpose(0, 1), k, v, ctx.starts, ctx.lens)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # its CPU fallback's
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
def test_jagged_attention_is_attention_per_sequence(lengths):
    q, k, v = qkv(lengths, 32, torch.float32)
    ctx = Context.encoder(lengths, False, torch.device("cpu"))
    got = jagged(q, k, v, ctx.jagged())
    assert got.shape == q.shape
    torch.testing.assert_close(got, reference(q, k, v, lengths), atol=2e-5, rtol=1e-4)


def causal_per_sequence(q, k, v, offsets, causal):
    """What torch's jagged call computes on CUDA, one sequence at a time: its CPU fallback has
    no causal mode, so the rows `_fresh` gathers and scatters are what this test checks."""
    assert causal
    bounds = offsets.tolist()
    return torch.cat(
        [
            F.scaled_dot_product_attention(
                *(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True
            ).transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
    )


def test_fresh_prefills_go_in_one_causal_call_and_the_rest_are_left(monkeypatch):
    monkeypatch.setattr(attention, "jagged", causal_per_sequence)
    lengths = [7, 1, 12, 5]
    q, k, v = qkv(lengths, 32, torch.float32)
    starts = packing.offsets(lengths)
    # the second has cached keys before it: not fresh, left to the per-prefill path
    prefills = [
        Prefill(starts[i], n, n if i != 1 else 9, None if i != 1 else torch.zeros(3), None)
        for i, n in enumerate(lengths)
    ]
    out = torch.full_like(q, float("nan"))
    left = Attention(HEADS, HEADS, 32)._fresh(q, k, v, prefills, out)
    assert left == [prefills[1]]
    for i in (0, 2, 3):
        rows = slice(starts[i], starts[i + 1])
        qs, ks, vs = (t[rows].transpose(0, 1) for t in (q, k, v))
        want = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
        torch.testing.assert_close(out[rows], want, atol=2e-5, rtol=1e-4)
    assert out[starts[1] : starts[2]].isnan().all()  # not written
