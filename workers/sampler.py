"""Choosing each sequence's next token from its logits, on the last stage.

Greedy rows take the argmax. Other rows are scaled by their temperature, cut to their top-k and
top-p, and drawn; a seeded row draws with a generator seeded from (seed, k), k being how many
tokens the sequence made before, so its tokens depend on nothing else in the batch and come out
the same when a sequence is recomputed after a fault.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MASK64 = (1 << 63) - 1


def draw_seed(seed: int, k: int) -> int:
    # splitmix64's mixing: nearby (seed, k) pairs give unrelated generator states
    z = (seed * 0x9E3779B97F4A7C15 + (k + 1) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & MASK64


def sample(
    logits: torch.Tensor,
    rows: list[list],
    argmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[int]:
    """logits [S, vocab] (float32, or the model's half precision); rows[i] = [batch index,
    temperature, top_k, top_p, seed, k] (seed -1: unseeded). One token id per row. `argmax`:
    each row's first index of its largest value, where a faster one than torch's is given (the
    C++ kernel on CPU)."""
    # the first of the largest, as argmax, which in bfloat16 takes 5x as long on CPU (and
    # widening first changes nothing: every bfloat16 is exactly a float32, in the same order)
    out = (argmax(logits) if argmax is not None else logits.max(dim=-1).indices).tolist()
    for i, (_, temperature, top_k, top_p, seed, k) in enumerate(rows):
        if temperature <= 0:
            continue
        x = logits[i].float() / temperature
        if 0 < top_k < x.shape[0]:
            cut = torch.topk(x, top_k).values[-1]
            x = x.masked_fill(x < cut, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least the top token)
            drop = sorted_probs.cumsum(0) - sorted_probs >= top_p
            probs = probs.scatter(0, order[drop], 0.0)
        gen = torch.Generator(device=logits.device)
        if seed >= 0:
            gen.manual_seed(draw_seed(seed, k))
        else:
            gen.seed()
        out[i] = int(torch.multinomial(probs, 1, generator=gen))
    return out
