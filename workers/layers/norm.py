"""Normalisations, replicated on every rank."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class LayerNorm(nn.LayerNorm):
    # the C++ add_norm (workers/layers/native.py), given by the runner where it applies
    fused: Callable[..., list[torch.Tensor]] | None = None

    def __init__(self, hidden: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__(hidden, eps=eps, dtype=dtype)
        self.requires_grad_(False)

    def add(
        self, x: torch.Tensor, y: torch.Tensor, cast: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """self(x + y), and that in `cast` (the next matmul's input): in one pass over each token
        where the kernel is given and takes these tensors (float32 x, contiguous)."""
        if (
            self.fused is not None
            and x.dim() == 2
            and x.dtype == torch.float32
            and cast in (torch.float32, torch.bfloat16)
            and x.is_contiguous()
            and y.dim() == 2
            and y.stride(1) == 1
        ):
            out, c = self.fused(x, y, self.weight, self.bias, self.eps, cast == torch.bfloat16)
            return out, c  # c is out itself when cast is float32
        out = self(x + y)
        return out, out.to(cast)


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalised in float32, scaled in the model's dtype, as transformers does."""

    # the C++ rms_norm (workers/layers/native.py), given by the runner where it applies
    fused: Callable[..., list[torch.Tensor]] | None = None

    def __init__(self, hidden: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._takes(x):
            return self.fused(x, None, self.weight, self.eps)[1]
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x + y and self(x + y): in one pass over each token where the kernel is given and
        takes these tensors."""
        if self._takes(x) and y.dim() == 2 and y.dtype == x.dtype and y.stride(1) == 1:
            s, out = self.fused(x, y, self.weight, self.eps)
            return s, out
        s = x + y
        return s, self(s)

    def _takes(self, x: torch.Tensor) -> bool:
        return (
            self.fused is not None
            and x.dim() == 2
            and x.stride(1) == 1
            and x.dtype == self.weight.dtype
            and x.device.type == "cpu"
        )
