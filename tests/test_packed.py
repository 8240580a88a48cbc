"""Linear layers and the LM head read a oneDNN-packed copy of their weight on CPU: the same
outputs as the plain matmul, for every batch size, in float32 and bfloat16, also with their rows
rounded up to a few sizes; a worker keeps every row count's compiled matmul, past oneDNN's
default of 1,024."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.backends import mkldnn

from workers.layers.embedding import ParallelLMHead
from workers.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    Packed,
    QKVParallelLinear,
    RowParallelLinear,
    packable,
    rows_for,
)
from workers.layers.parallel import TPGroup

SOLO = TPGroup(0, 1, None)
pytestmark = pytest.mark.skipif(not mkldnn.is_available(), reason="this torch has no oneDNN")


def layers(dtype: torch.dtype) -> list[Packed]:
    return [
        ParallelLMHead(1000, 64, SOLO, bias=True, dtype=dtype),
        ParallelLMHead(1000, 64, SOLO, bias=False, dtype=dtype),
        ColumnParallelLinear(64, 96, SOLO, dtype=dtype),
        MergedColumnParallelLinear(64, [48, 48], SOLO, dtype=dtype),
        QKVParallelLinear(64, 16, 4, 2, SOLO, dtype=dtype),
        RowParallelLinear(64, 80, SOLO, dtype=dtype),
    ]


def filled(dtype: torch.dtype) -> list[Packed]:
    """`layers`, their parameters drawn at random (seeded), where oneDNN computes `dtype`."""
    if not packable(dtype):
        pytest.skip("oneDNN does not compute bfloat16 on this CPU")
    torch.manual_seed(0)
    out = layers(dtype)
    with torch.no_grad():
        for layer in out:
            for p in layer.parameters():
                p.normal_()
    return out


def assert_same(got: object, want: object) -> None:
    """One layer's outputs (a tensor, or a list of them) within bfloat16's tolerance."""
    got = got if isinstance(got, list | tuple) else [got]
    want = want if isinstance(want, list | tuple) else [want]
    for g, e in zip(got, want, strict=True):
        assert g.shape == e.shape
        torch.testing.assert_close(g.float(), e.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_packed_layers_give_the_plain_outputs(dtype: torch.dtype) -> None:
    for layer in filled(dtype):
        plain = {rows: torch.randn(rows, 64, dtype=dtype) for rows in (1, 3, 64, 300)}
        want = {rows: layer(h) for rows, h in plain.items()}
        layer.pack()
        assert layer.weight is None and layer.packed is not None  # one copy of the weight
        for rows, h in plain.items():  # one packing serves every batch size
            assert_same(layer(h), want[rows])


def test_float16_keeps_its_plain_weight() -> None:
    layer = ColumnParallelLinear(16, 8, SOLO, dtype=torch.float16)  # oneDNN packs no float16
    layer.pack()
    assert layer.packed is None and layer.weight is not None


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu", "silu"])
def test_activation_fused_into_the_packed_matmul(act: str) -> None:
    torch.manual_seed(0)
    layer = ColumnParallelLinear(64, 96, SOLO, dtype=torch.float32)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.2)
    h = torch.randn(37, 64)
    want = layer.linear(h, layer.bias, act)  # plain matmul, then the activation
    layer.pack()
    torch.testing.assert_close(layer.linear(h, layer.bias, act), want, rtol=1e-4, atol=1e-4)


def test_row_counts_round_up_to_few_sizes() -> None:
    sizes = {rows_for(r) for r in range(1, 8193)}
    for r in range(1, 8193):
        n = rows_for(r)
        assert n >= r and (r <= 16 and n == r or n % 16 == 0)
        assert r < 256 or n - r <= r / 16
    assert len(sizes) < 16 + 16 * 6  # 16 single rows, then at most 16 sizes an octave


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_rounded_rows_give_the_same_outputs(dtype: torch.dtype) -> None:
    for layer in filled(dtype):
        layer.pack()
        for rows in (5, 17, 300, 777):
            h = torch.randn(rows, 64, dtype=dtype)
            layer.round_rows = False
            want = layer(h)
            layer.round_rows = True
            assert_same(layer(h), want)


ROW_COUNTS = """
import sys, torch
from workers.main import cache_matmuls
if sys.argv[1] == "worker":
    cache_matmuls()
w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(64, 32))
xs = [torch.randn(m, 32) for m in range(1, 1101)]
for r in range(2):
    print("ROUND", r, flush=True)
    for x in xs:
        torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
"""


def compiled_again(setup: str) -> int:
    """How many of 1,100 row counts' matmuls oneDNN compiled a second time (its own log)."""
    env = {**os.environ, "ONEDNN_VERBOSE": "all"}
    env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
    out = subprocess.run(
        [sys.executable, "-c", ROW_COUNTS, setup],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    ).stdout
    return out.partition("ROUND 1")[2].count("create:cache_miss")


def test_a_worker_keeps_the_matmuls_of_many_row_counts() -> None:
    assert compiled_again("default") == 1100  # the check sees what it should: 1,024 kept
    assert compiled_again("worker") == 0
