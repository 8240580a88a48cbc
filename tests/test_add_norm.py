"""The encoder's residual add and LayerNorm in one C++ pass against torch's LayerNorm(x + y): the
float32 stream within float32's rounding, its bfloat16 copy exactly that stream rounded; y in
float32 or bfloat16, as the strided view a fused projection gives; the layer falls back to torch
where the kernel does not apply."""

from __future__ import annotations

import struct

import pytest
import torch

from workers.layers import native
from workers.layers.norm import LayerNorm

HIDDEN = 384


@pytest.fixture(scope="module")
def kernel():
    module = native.kernels()
    assert module is not None, "the C++ kernels did not build (see the log)"
    return module.add_norm


@pytest.fixture(scope="module")
def norm() -> LayerNorm:
    torch.manual_seed(1)
    n = LayerNorm(HIDDEN, 1e-12)
    n.weight.data.normal_()
    n.bias.data.normal_()
    return n


@pytest.mark.parametrize("rows", [1, 63, 64, 65, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_kernel_is_layer_norm_of_the_sum(kernel, norm, rows, dtype):
    torch.manual_seed(rows)
    x = torch.randn(rows, HIDDEN) * 3
    y = (torch.randn(rows, 3 * HIDDEN) * 2).to(dtype)[:, HIDDEN : 2 * HIDDEN]  # strided rows
    want = norm(x + y)
    out, cast = kernel(x, y, norm.weight, norm.bias, norm.eps, True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert cast.dtype == torch.bfloat16 and torch.equal(cast, out.to(torch.bfloat16))
    same, again = kernel(x, y, norm.weight, norm.bias, norm.eps, False)
    assert again.data_ptr() == same.data_ptr() and torch.equal(same, out)


def test_rounding_is_to_nearest_even_and_keeps_nan(kernel):
    h = 16
    # a zero weight makes the output the bias exactly: halfway between two bfloat16 values, each
    # rounds to the one whose last bit is even (1.0 down, 1.0234375 up), as torch rounds
    ties = [0x3F808000, 0x3F818000, 0xBF808000, 0x3F80C000] * 4
    bias = torch.tensor([struct.unpack("<f", struct.pack("<I", t))[0] for t in ties])
    x = torch.randn(4, h)
    x[3, 5] = float("nan")  # a NaN anywhere in a row makes the whole row NaN
    out, cast = kernel(x, torch.zeros(4, h), torch.zeros(h), bias, 1e-5, True)
    assert torch.equal(out[:3], bias.expand(3, h))
    bits = cast[:3].view(torch.int16).int() & 0xFFFF
    assert bits[:, :4].tolist() == [[0x3F80, 0x3F82, 0xBF80, 0x3F81]] * 3
    assert torch.equal(cast[:3], bias.expand(3, h).to(torch.bfloat16))
    assert cast[3].isnan().all() and out[3].isnan().all()


def test_kernel_refuses_what_it_cannot_compute(kernel, norm):
    x = torch.randn(4, HIDDEN)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernel(x[:, :40], x[:, :40], norm.weight[:40], norm.bias[:40], 1e-12, False)
    with pytest.raises(RuntimeError, match="float32"):
        kernel(x.double(), x, norm.weight, norm.bias, 1e-12, False)
    with pytest.raises(RuntimeError, match="alike"):
        kernel(x, x[:2], norm.weight, norm.bias, 1e-12, False)


def test_the_layer_takes_the_kernel_or_torch_alike(kernel, norm):
    torch.manual_seed(2)
    x, y = torch.randn(50, HIDDEN), torch.randn(50, HIDDEN).to(torch.bfloat16)
    plain = norm.add(x, y, torch.bfloat16)
    norm.fused = kernel
    try:
        fused = norm.add(x, y, torch.bfloat16)
        padded = norm.add(x[None], y[None], torch.bfloat16)  # [B, L, H]: not the kernel's
    finally:
        norm.fused = None
    torch.testing.assert_close(fused[0], plain[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(padded[0][0], plain[0])
    assert fused[1].dtype == plain[1].dtype == torch.bfloat16
