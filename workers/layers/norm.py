"""Normalisations, replicated on every rank."""

from __future__ import annotations

import torch
from torch import nn


class LayerNorm(nn.LayerNorm):
    def __init__(self, hidden: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__(hidden, eps=eps, dtype=dtype)
        self.requires_grad_(False)


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalised in float32, scaled in the model's dtype, as transformers does."""

    def __init__(self, hidden: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
