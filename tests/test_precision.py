"""Half precision where it pays: refused on a CPU that would emulate it, and within stated
tolerances of float32 where it runs (embeddings against sentence-transformers' float32, greedy
tokens against transformers' float32 logits)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from corpus import MODEL, reference, texts
from decoders import A, B, C, Engine, gpt2, llama, reference_logits, scenario

from controller.config import ConfigError, check, load
from workers import packing
from workers.layers.attention import Context
from workers.layers.parallel import TPGroup
from workers.layers.screen import screenable
from workers.models import build, load_info
from workers.precision import cpu_flags, refusal
from workers.runner import use_packed_kernels
from workers.tokenizer import Tokenizer

BF16 = refusal("bfloat16", "cpu") is None
needs_bf16 = pytest.mark.skipif(not BF16, reason="this CPU has no native bfloat16 matmuls")
# bfloat16 keeps 8 bits of mantissa: a greedy token is right if transformers' float32 logit for
# it is within this of the top one (the tiny test models' logits spread over about +-10)
BF16_MARGIN = 0.25


def test_half_precision_is_refused_where_the_cpu_would_emulate_it():
    assert refusal("float32", "cpu", set()) is None
    assert refusal("bfloat16", "cuda", set()) is None  # CUDA computes it natively
    assert refusal("bfloat16", "cpu", {"avx512f", "avx512_bf16"}) is None
    assert refusal("bfloat16", "cpu", {"amx_bf16"}) is None
    message = refusal("bfloat16", "cpu", {"avx2", "avx512f"})
    assert message is not None and "avx512_bf16" in message and "float32" in message
    assert refusal("float16", "cpu", {"avx512_bf16"}) is not None
    if "avx512_fp16" not in cpu_flags() and "amx_fp16" not in cpu_flags():
        with pytest.raises(ConfigError, match="emulated"):
            check(load(None, ["model.dtype=float16"]))


@needs_bf16
@pytest.mark.parametrize("kernel", [False, True], ids=["flash", "kernel"])
def test_bfloat16_embeddings_within_tolerance(kernel):
    info = load_info(MODEL)
    corpus = texts(40)
    seqs = [e.ids for e in Tokenizer(info).encode(corpus)]
    model = build(info, 0, 1, TPGroup(0, 1, None), dtype=torch.bfloat16)
    if kernel:
        assert use_packed_kernels(model, torch.device("cpu"), torch.bfloat16), "no C++ kernel"
    x, seq_lens = packing.pack(seqs)
    with torch.inference_mode():
        got = model(x, Context.encoder(seq_lens, False, torch.device("cpu"))).float()
    cosine = F.cosine_similarity(got, reference(corpus))
    assert cosine.min().item() >= 0.9999, cosine.min()


@needs_bf16
@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("screen", [False, True], ids=["head", "screened"])
def test_bfloat16_greedy_tokens_within_margin(make, screen, tmp_path):
    # screened (where the CPU has int8 matmuls): the argmax of the head's unrounded logits
    directory = make(tmp_path)
    engine = Engine(directory, 1, compiled=True, dtype=torch.bfloat16, screen=screen)
    assert engine.runners[0].model.screened == (screen and screenable(torch.zeros(1, 1)))
    out = scenario(engine)
    worst = 0.0
    for seq, prompt in ((0, A), (1, B), (2, C)):
        logits = reference_logits(directory, prompt + out[seq])
        for k, token in enumerate(out[seq]):
            row = logits[len(prompt) + k - 1]
            worst = max(worst, float(row.max() - row[token]))
    assert worst <= BF16_MARGIN, worst
