"""Padding-free batches: sequences laid end to end as one [T, ...] tensor plus their lengths."""

from __future__ import annotations

import itertools

import torch


def pack(
    seqs: list[list[int]], device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, list[int]]:
    """Flat int64 ids [T] and each sequence's length."""
    seq_lens = [len(s) for s in seqs]
    ids = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.int64, device=device)
    return ids, seq_lens


def offsets(seq_lens: list[int]) -> list[int]:
    """Start of each sequence in the packed tensor, plus the total: length n + 1."""
    return [0, *itertools.accumulate(seq_lens)]


def segments(seq_lens: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
    """Sequence index of each packed token [T]."""
    lens = torch.tensor(seq_lens, dtype=torch.int64, device=device)
    return torch.repeat_interleave(torch.arange(len(seq_lens), device=device), lens)


def positions(seq_lens: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
    """Position of each packed token within its own sequence: 0..L-1 per sequence [T]."""
    starts = torch.tensor(offsets(seq_lens)[:-1], dtype=torch.int64, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int64, device=device)
    total = sum(seq_lens)
    return torch.arange(total, device=device) - torch.repeat_interleave(
        starts, lens, output_size=total
    )


def mask(seq_lens: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
    """True where a padded [n, max_len] slot holds a real token."""
    lens = torch.tensor(seq_lens, dtype=torch.int64, device=device)
    return torch.arange(max(seq_lens, default=0), device=device) < lens[:, None]


def pad(x: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """Packed [T, ...] -> zero-padded [n, max_len, ...]."""
    out = x.new_zeros(len(seq_lens), max(seq_lens, default=0), *x.shape[1:])
    out[mask(seq_lens, x.device)] = x
    return out


def unpad(x: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """Padded [n, max_len, ...] -> packed [T, ...]; inverse of `pad`."""
    return x[mask(seq_lens, x.device)]
