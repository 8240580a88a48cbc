"""Llama's block ops as single C++ passes (RMSNorm after the residual add, SwiGLU's gating,
rotary positions), and greedy sampling's argmax, against the torch ops they replace: float32 within its rounding, bfloat16
within one step of it (the kernels round where the torch ops round, but sum in their own order);
the inputs are the strided views the block hands them."""

from __future__ import annotations

import pytest
import torch

from workers.layers import native
from workers.layers.activation import silu_and_mul
from workers.layers.norm import RMSNorm
from workers.layers.rotary import Rotary

DTYPES = [torch.float32, torch.bfloat16]
IDS = ["f32", "bf16"]


@pytest.fixture(scope="module")
def module():
    m = native.kernels()
    assert m is not None, "the C++ kernels did not build (see the log)"
    return m


def near(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # one bfloat16 step: 8 bits of mantissa
        torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=2**-7)


@pytest.mark.parametrize("rows", [1, 17, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_rms_norm_of_the_sum(module, rows, dtype):
    torch.manual_seed(rows)
    h = 512
    norm = RMSNorm(h, 1e-6, dtype)
    norm.weight.data.normal_()
    x = (torch.randn(rows, h) * 3).to(dtype)
    y = (torch.randn(rows, 3 * h) * 2).to(dtype)[:, h : 2 * h]  # a strided view, as a split
    s, want = norm.add(x, y)  # the torch ops (no kernel given)
    norm.fused = module.rms_norm
    got_s, got = norm.add(x, y)
    assert torch.equal(got_s, s)  # the sum rounds alike
    near(got, want)
    near(norm(x), _plain(norm, x))  # the first norm of a block: no sum


def _plain(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    fused, norm.fused = norm.fused, None
    try:
        return norm(x)
    finally:
        norm.fused = fused


@pytest.mark.parametrize("rows", [1, 5, 200])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_silu_and_mul_of_a_merged_projection(module, rows, dtype):
    torch.manual_seed(rows)
    inner = 688  # the 1,376 of the benchmarks' Llama over 2 ranks
    gate, up = (torch.randn(rows, 2 * inner) * 4).to(dtype).split(inner, dim=-1)
    near(module.silu_and_mul(gate, up), silu_and_mul(gate, up))
    # far out on either side: silu(-100) is -0 (no overflow to NaN), silu(100) is 100
    edge = torch.tensor([[-100.0, 100.0, -88.5, 88.5] * 4]).to(dtype)
    ones = torch.ones_like(edge)
    near(module.silu_and_mul(edge, ones), silu_and_mul(edge, ones))


@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_rotary_in_place_on_the_fused_qkv_output(module, head_dim, dtype):
    torch.manual_seed(head_dim)
    rows, heads, kv_heads = 37, 4, 2
    rotary = Rotary(head_dim, 4096, 10000.0, None)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim).to(dtype)
    positions = torch.randint(0, 4096, (rows,))

    def views(t: torch.Tensor) -> list[torch.Tensor]:
        sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        return [p.unflatten(-1, (-1, head_dim)) for p in t.split(sizes, dim=-1)]

    q, k, v = views(qkv.clone())
    want_q, want_k = rotary(positions, q, k)  # the torch ops (no kernel given)
    rotary.fused = module.rotary
    q, k, v = views(qkv)
    got_q, got_k = rotary(positions, q, k)
    assert got_q.data_ptr() == q.data_ptr()  # in place
    near(got_q, want_q)
    near(got_k, want_k)
    assert torch.equal(v, views(qkv.clone())[2])  # the values are left alone


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 40, 50257])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_argmax_is_torchs_first_index_of_the_largest(module, vocab, dtype):
    torch.manual_seed(vocab)
    rows = 9
    logits = torch.randn(rows, vocab + 3).to(dtype)[:, 2 : 2 + vocab]  # strided rows
    if vocab > 32:
        top = float(logits.float().max()) + 1
        logits[1, [3, vocab - 1]] = top  # a tie across lanes: the earlier wins
        logits[2, [5, 5 + 16]] = top  # a tie within a lane
        logits[3, [vocab - 1, 7]] = float("nan")  # NaN outranks every number; the first of them
        logits[4, vocab - 1] = top  # the largest in the tail past the last whole vector
        logits[5] = -float("inf")  # all alike: index 0
    assert module.argmax(logits).tolist() == logits.max(dim=-1).indices.tolist()


def test_refusals(module):
    with pytest.raises(RuntimeError, match="multiple of 16"):
        module.rms_norm(torch.randn(2, 24), None, torch.randn(24), 1e-6)
    with pytest.raises(RuntimeError, match="in x's dtype"):
        module.rms_norm(torch.randn(2, 32), None, torch.randn(32).bfloat16(), 1e-6)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        module.silu_and_mul(torch.randn(2, 24), torch.randn(2, 24))
    q, k = torch.randn(3, 2, 64), torch.randn(3, 1, 64)
    tables = torch.randn(10, 64), torch.randn(10, 64)
    with pytest.raises(RuntimeError, match="beyond the tables"):
        module.rotary(q, k, *tables, torch.tensor([0, 5, 10]))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        module.rotary(torch.randn(3, 2, 16), torch.randn(3, 1, 16), *tables, torch.zeros(3))
