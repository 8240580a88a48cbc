"""The screened LM head: greedy rows take the argmax of the head's logits (float32 sums of its
weight's products) from int8 logits and a bound on their error (workers/layers/screen.py,
screen.cpp). Held to the argmax of torch's float32 logits on random heads, float32 and
bfloat16, and on the cases a bound could get wrong: ties, near ties that int8 cannot tell apart,
a zero row, non-finite values; and the bound itself to exact (float64) dot products. Skipped on
a CPU without int8 matmuls (VNNI, AMX), where the head is never screened."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.layers import native
from workers.layers.embedding import ParallelLMHead, first_best
from workers.layers.parallel import TPGroup
from workers.layers.screen import C1, Int8Copy, int8_matmuls, screenable

pytestmark = pytest.mark.skipif(
    not (int8_matmuls() and native.kernels()), reason="no int8 matmuls (or no C++ kernels) here"
)


def head(
    vocab: int, dim: int, bias: bool, seed: int, dtype: torch.dtype = torch.float32
) -> ParallelLMHead:
    torch.manual_seed(seed)
    h = ParallelLMHead(vocab, dim, TPGroup(0, 1, None), bias=bias, dtype=dtype)
    h.weight.data.normal_(0, 0.02)
    if h.bias is not None:
        h.bias.data.normal_(0, 0.1)
    h.screen = True
    return h


def want(h: ParallelLMHead, x: torch.Tensor) -> list[int]:
    """torch's float32 logits' argmax (the first of the largest; the first NaN), of the head's
    values widened to float32."""
    b = h.bias.float() if h.bias is not None else None
    return F.linear(x.float(), h.weight.float(), b).max(dim=-1).indices.tolist()


def packed(h: ParallelLMHead) -> ParallelLMHead:
    h.pack()
    assert h.screened and h.weight is not None  # the plain weight stays for the candidates
    return h


@pytest.mark.parametrize("vocab", [11, 1000, 5003])
@pytest.mark.parametrize("dim", [64, 200])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_greedy_is_the_heads_argmax(vocab, dim, bias, dtype):
    h = packed(head(vocab, dim, bias, vocab + dim, dtype))
    x = torch.randn(300, dim).to(dtype)  # past 256 rows: AMX's rounded row counts too
    assert h.greedy(x).tolist() == want(h, x)
    assert h.greedy(x[:1]).tolist() == want(h, x[:1])
    assert h.greedy(x[:37]).tolist() == want(h, x[:37])  # a row count padded on AMX


def test_ties_and_near_ties():
    vocab, dim = 4099, 512
    h = head(vocab, dim, False, 1)
    w = h.weight.data
    w[3000] = w[17]  # an exact tie: the earlier word wins
    w[40] = w[2000] * (1 + 2**-12)  # the same in int8; float32 tells the later one larger
    w[41] = w[40] * (1 + 2**-20)  # and one larger still, by less than a bfloat16 step
    w[4097] = w[4096]  # a tie in the tail past the last whole vector
    packed(h)
    x = torch.stack(
        [
            w[17] * 400,
            w[2000] * 400,
            w[4096] * 400,
            torch.zeros(dim),  # every logit 0: word 0
            w[17] * 400 + torch.randn(dim) * 1e-3,
        ]
    )
    got = h.greedy(x).tolist()
    assert got == want(h, x)
    assert got[:4] == [17, 41, 4096, 0]


def test_non_finite_rows_as_torch():
    h = packed(head(1000, 64, True, 2))
    x = torch.randn(4, 64)
    x[0, 5] = float("nan")  # every logit NaN: the first
    x[1, 3] = float("inf")  # +inf, -inf and NaN logits
    x[2] *= 1e38  # logits past float32's range
    assert h.greedy(x).tolist() == want(h, x)
    h.bias.data[700] = float("nan")  # a NaN in the checkpoint's bias: that word, on every row
    assert h.greedy(x).tolist() == want(h, x)


@pytest.mark.parametrize("dim", [512, 2048])
def test_the_bound_holds(dim):
    """|int8 logit + bias - exact logit| within screen.cpp's E_j, for every word, on rows whose
    values sit near their int8 rounding midpoints (the largest input error), and on rows of
    every magnitude; 2,048 products: sums past 2^24, rounded to float32."""
    kernels = native.kernels()
    torch.manual_seed(dim)
    vocab = 3000
    w = torch.randn(vocab, dim) * 0.05
    w[7] = 0  # a zero row
    w[8, : dim // 2] = 0
    w[9] = torch.full((dim,), 0.05)  # every product at its largest: int sums past 2^24
    b = torch.randn(vocab)
    steps = 2.0 ** torch.randint(-6, 6, (8, 1)).float() / 127
    x = steps * (torch.randint(-127, 127, (8, dim)) + 0.5 - 2**-10)  # just below a midpoint
    x[:, 0] = steps[:, 0] * 127  # the row's largest sets its scale
    x = torch.cat([x, torch.randn(8, dim) * 3, torch.randn(4, dim) * 1e-30, x.abs()[:2]])
    c = Int8Copy.of(w)
    q, scale, nx, dx = kernels.quantize_rows(x)
    a = torch.ops.onednn.qlinear_pointwise(
        q, 1.0, 128, c.packed, c.scales, c.zeros, None, 1.0, 0, torch.bfloat16, "none", [], ""
    ).float() * scale[:, None]  # fmt: skip
    exact = x.double() @ w.double().T + b.double()
    err = ((a + b).double() - exact).abs()
    limit = C1 * (a.abs() + b.abs()) + nx[:, None] * c.radius + dx[:, None] * c.size
    assert bool((err <= limit.double()).all()), float((err / limit).max())
    assert float((err / limit).max()) > 0.01  # the bound is not vacuous for these rows


def test_first_best_over_ranks():
    nan, inf = float("nan"), float("inf")
    values = torch.tensor([[1.0, 2.0, 0.5, -inf, 3.0], [1.0, 5.0, nan, -inf, nan]])
    ids = torch.tensor([[3, 4, 5, 6, 7], [103, 104, 105, 106, 107]])
    # a tie keeps the earlier rank's word; NaN outranks numbers; all -inf: the first
    assert first_best(values, ids).tolist() == [3, 104, 105, 6, 107]


def test_what_is_not_screened():
    assert not screenable(torch.zeros(4, 4, dtype=torch.float16))
    assert not screenable(torch.tensor([[1.0, float("inf")]]))  # no int8 copy of that
    assert screenable(torch.zeros(4, 4, dtype=torch.bfloat16))
    h = head(100, 32, False, 4)
    h.screen = False
    h.pack()
    assert not h.screened


def test_a_step_of_greedy_and_drawn_rows(tmp_path):
    """Through a runner: greedy rows from the screened head, drawn ones from float32 logits,
    each row's token as the runner without the screen gives it."""
    from decoders import Engine, gpt2

    directory = gpt2(tmp_path)
    screened = Engine(directory, 1, screen=True).runners[0]
    plain = Engine(directory, 1).runners[0]
    assert screened.model.screened and not plain.model.screened
    torch.manual_seed(5)
    h = torch.randn(4, 64)
    rows = [[0, 0.0, 0, 1.0, -1, 0], [1, 1.0, 0, 1.0, 7, 2], [2, 0.0, 0, 1.0, -1, 0]]
    rows.append([3, 0.7, 5, 0.9, 11, 0])
    assert screened.sample(h, rows) == plain.sample(h, rows)
    assert screened.sample(h, rows[::2]) == plain.sample(h, rows[::2])  # greedy only
