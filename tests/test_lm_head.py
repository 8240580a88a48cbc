"""The LM head: its oneDNN-packed weight on CPU gives the logits of the plain matmul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.backends import mkldnn

from workers.layers.embedding import ParallelLMHead
from workers.layers.parallel import TPGroup


@pytest.mark.skipif(not mkldnn.is_available(), reason="this torch has no oneDNN")
@pytest.mark.parametrize("bias", [False, True])
def test_packed_head_gives_the_plain_logits(bias: bool) -> None:
    torch.manual_seed(0)
    head = ParallelLMHead(1000, 64, TPGroup(0, 1, None), bias=bias, dtype=torch.float32)
    with torch.no_grad():
        head.weight.normal_()
        if bias:
            head.bias.normal_()
    weight = head.weight.detach().clone()
    head.pack()
    assert head.weight is None and head.packed is not None  # one copy of the weight
    for rows in (1, 3, 64, 300):  # one packing serves every batch size
        h = torch.randn(rows, 64)
        want = F.linear(h, weight, head.bias)
        torch.testing.assert_close(head(h), want, rtol=1e-5, atol=1e-4)


def test_a_half_precision_head_keeps_its_plain_weight() -> None:
    head = ParallelLMHead(100, 16, TPGroup(0, 1, None), dtype=torch.bfloat16)
    head.pack()
    assert head.packed is None and head.weight is not None
