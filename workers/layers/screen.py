"""A screened LM head's int8 copy: every word's logit from oneDNN's int8 matmul, and the bound
that lets `screen.cpp` take the head's own argmax from them (docs/performance.md, "Greedy tokens
from an int8 screen").

The head's greedy token is the argmax of its logits as the kernel scores them from the head's
weight: x . w_j + b_j, products summed in float32 (for a bfloat16 head, its bfloat16 rows and
inputs widened, so not rounded to bfloat16 again as its matmul's output is). The int8 copy holds
each word's row quantised (p_j = round(w_j / t_j), t_j its largest magnitude / 127); each input
row is quantised the same way at run time (`quantize_rows`). The matmul sums those integer
products exactly and scales them; what separates its logit a_j from the head's is the two
quantisations' errors, bounded per word and per row by norms (screen.cpp's E_j), the scalings'
roundings (c1) and the float32 sum the head's score is (g).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from workers.layers import native
from workers.layers.linear import amx, padded
from workers.pool import pooled
from workers.precision import cpu_flags

# float32's unit roundoff. The int8 logit is the exact integer sum scaled (int32 to float32, by
# t_j), rounded to bfloat16 (half the bytes to write and read again: 2^-8 of it), scaled by the
# row's scale, a bias added on both sides: 16 float32 roundings cover all but bfloat16's.
U = 2.0**-24
BF16 = 2.0**-8
C1 = (BF16 / (1 - BF16) + 16 * U) * 1.01
WIDEN = 1.01  # the norms' own rounding and the comparisons'


@functools.cache
def int8_matmuls() -> bool:
    """Whether oneDNN computes int8 matmuls here exactly and fast: AMX-INT8 or VNNI (without
    them its AVX-512 path pairs products in saturating 16-bit sums, which the bound does not
    cover), and this torch has the ops."""
    flags = cpu_flags()
    return (
        torch.backends.mkldnn.is_available()
        and any(f in flags for f in ("amx_int8", "avx512_vnni", "avx_vnni"))
        and hasattr(torch.ops.onednn, "qlinear_prepack")
        and hasattr(torch.ops.onednn, "qlinear_pointwise")
    )


def screens(screen_greedy: bool, device: str) -> bool:
    """Whether a decoder's private LM head will be screened with this config (`model.
    screen_greedy`, `device`) on this machine: what the pool's plan counts its int8 copy by,
    the same in `baton up` and every worker (a head whose weights turn out not finite, or
    whose kernels did not build, is not screened after all: counted, not kept)."""
    return screen_greedy and device.startswith("cpu") and int8_matmuls()


def screenable(w: torch.Tensor) -> bool:
    """Whether a head with weight `w` can be screened: a private float32 or bfloat16 weight on a
    CPU with int8 matmuls, every value finite, and the C++ kernels built."""
    return (
        w.device.type == "cpu"
        and w.dtype in (torch.float32, torch.bfloat16)
        and not pooled(w)
        and int8_matmuls()
        and native.kernels() is not None
        and bool(w.isfinite().all())
    )


def summation(dim: int) -> float:
    """g: a float32 sum of `dim` products is within g sum_i |x_i w_i| of the exact one."""
    return dim * U / (1 - dim * U)


@dataclass(slots=True)
class Int8Copy:
    """A weight [words, dim] in int8 (a scale a word) in oneDNN's layout, with each word's
    radius r_j = |w_j - w^_j| + g |w_j| and size m_j = |w^_j|, widened, and their largest."""

    packed: torch.Tensor
    scales: torch.Tensor  # t_j, float32
    zeros: torch.Tensor  # the weight's zero points: none
    radius: torch.Tensor
    size: torch.Tensor
    most_radius: float
    most_size: float

    @classmethod
    def of(cls, w: torch.Tensor, chunk: int = 4096) -> Int8Copy:
        words, dim = w.shape
        g = summation(dim)
        q = torch.empty(words, dim, dtype=torch.int8)
        t = torch.empty(words)
        radius, size = torch.empty(words), torch.empty(words)
        for i in range(0, words, chunk):  # in float64 a chunk at a time: 8 bytes a value
            w64 = w[i : i + chunk].detach().double()
            top = w64.abs().amax(dim=1)
            scale = torch.where(top > 0, top / 127, 1.0).float()  # a zero row: all zeros
            p = torch.round(w64 / scale.double()[:, None]).clamp(-127, 127)
            quantised = p * scale.double()[:, None]  # exact: 7 bits times 24
            q[i : i + chunk] = p.to(torch.int8)
            t[i : i + chunk] = scale
            radius[i : i + chunk] = ((w64 - quantised).norm(dim=1) + g * w64.norm(dim=1)) * WIDEN
            size[i : i + chunk] = quantised.norm(dim=1) * WIDEN
        return cls(
            torch.ops.onednn.qlinear_prepack(q, [128, dim]),
            t,
            torch.zeros(words, dtype=torch.int64),
            radius,
            size,
            float(radius.max()),
            float(size.max()),
        )

    def argmax(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, words: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows x [S, dim] -> (each row's argmax over the first `words` of x w^T + b, the first
        of equals, as int64 [S]; its logit, float32 [S])."""
        kernels = native.kernels()
        assert kernels is not None  # `screenable` built it
        x = x.float().contiguous()
        q, scale, nx, dx = kernels.quantize_rows(x)
        q = padded(q, 128) if amx() else q  # AMX: a few row counts, as `Packed`'s (128: zero)
        approx = torch.ops.onednn.qlinear_pointwise(
            q, 1.0, 128, self.packed, self.scales, self.zeros, None, 1.0, 0, torch.bfloat16,
            "none", [], "",
        )  # fmt: skip
        b = bias.float() if bias is not None else None
        return kernels.screen_argmax(
            approx, scale, nx, dx, x, weight, self.radius, self.size, self.most_radius,
            self.most_size, b, words, C1,
        )  # fmt: skip
