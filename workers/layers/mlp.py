"""The feed-forward blocks: up-projection split by columns, activation, down-projection summed
over ranks (one all-reduce)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from workers.layers.activation import activation, silu_and_mul
from workers.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    RowParallelLinear,
)
from workers.layers.parallel import TPGroup


class MLP(nn.Module):
    """BERT's and GPT-2's: up, activation, down."""

    def __init__(
        self, hidden: int, inner: int, act: str, tp: TPGroup, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.up = ColumnParallelLinear(hidden, inner, tp, dtype=dtype)
        activation(act)  # refused here if unknown
        self.act = act
        self.down = RowParallelLinear(inner, hidden, tp, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up.linear(x, self.up.bias, self.act))


class GatedMLP(nn.Module):
    """Llama's SwiGLU: gate and up in one matmul, silu(gate) * up, down."""

    # the C++ silu_and_mul (workers/layers/native.py), given by the runner where it applies
    fused: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __init__(
        self, hidden: int, inner: int, tp: TPGroup, bias: bool, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.gate_up = MergedColumnParallelLinear(hidden, [inner, inner], tp, bias, dtype)
        self.down = RowParallelLinear(inner, hidden, tp, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        if self.fused is not None and gate.dim() == 2 and gate.device.type == "cpu":
            return self.down(self.fused(gate, up))
        return self.down(silu_and_mul(gate, up))
