"""The fleet on a GPU (`device = "cuda"`): the decoders' greedy tokens equal transformers' argmax,
and the encoder's embeddings match sentence-transformers, through the whole fleet, tensor 1 x
pipeline 1. Skipped where no GPU is visible."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import start
from corpus import model_dir, texts
from decoders import check_greedy, gpt2, llama
from test_generate import DECODER, joining, prompts

from baton.client import Client
from baton.launch import REPO, Fleet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")
WAIT_S = 240


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def fleet(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[tuple[Fleet, Path]]:
    checkpoint = {"gpt2": gpt2, "llama": llama}[request.param](tmp_path_factory.mktemp("ckpt"))
    f = start(f"model.path={checkpoint}", "device=cuda", *DECODER)
    try:
        yield f, checkpoint
    finally:
        assert f.stop() == 0


def greedy_through(f: Fleet, checkpoint: Path, first: list, later: list) -> None:
    """`later` prompts joining `first` mid-generation through the fleet: every one's greedy
    tokens are transformers' argmax."""

    async def go():
        async with Client(f.endpoint, timeout_s=WAIT_S) as client:
            return await joining(client, first, later, 20)

    for prompt, r in zip(first + later, asyncio.run(go()), strict=True):
        assert r.ok, r.error
        check_greedy(checkpoint, prompt, r.token_ids)


def test_greedy_matches_transformers_on_cuda(fleet: tuple[Fleet, Path]) -> None:
    f, checkpoint = fleet
    greedy_through(f, checkpoint, prompts(4, seed=1), prompts(12, seed=2))


def minilm() -> Path:
    """The float16 copy ../shared/gpu/prepare makes (the float32 package is too large to travel
    to the GPU machine), else the installed package's model."""
    f16 = REPO / ".gpu-model" / "minilm-f16"
    return f16 if (f16 / "config.json").is_file() else model_dir()


@pytest.mark.parametrize("dtype, bound", [("float32", 0.9999), ("float16", 0.999)])
def test_embeddings_match_sentence_transformers_on_cuda(dtype: str, bound: float) -> None:
    """The encoder on a GPU, its attention over the packed texts in one jagged call a layer:
    sentence-transformers' float32 embeddings (of the same checkpoint, on CPU) within the
    issue's tolerance."""
    from sentence_transformers import SentenceTransformer
    from test_fleet import embed

    chosen = [t for t in texts(220, seed=1) if t.strip()][:200]
    with torch.inference_mode():
        model = SentenceTransformer(str(minilm()), device="cpu").float()
        ref = model.encode(chosen, convert_to_tensor=True, batch_size=64).float()
    f = start(f"model.path={minilm()}", "device=cuda", f'model.dtype="{dtype}"')
    try:
        got = embed(f, chosen)
    finally:
        assert f.stop() == 0
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
    assert cos.min() >= bound, f"{dtype}: cosine {cos.min():.6f}"


def test_a_pooled_decoder_on_cuda_copies_its_layers_in_ahead(tmp_path: Path) -> None:
    """Half of the worker's weights in the pinned pool, copied to the GPU ahead of their use on
    a stream of their own: the same greedy tokens as transformers."""
    from baton.client import BlockingClient

    checkpoint = gpt2(tmp_path)
    f = start(f"model.path={checkpoint}", "device=cuda", "memory.weight_budget=0.5", *DECODER)
    try:
        greedy_through(f, checkpoint, prompts(4, seed=3), prompts(4, seed=4))
        with BlockingClient(f.endpoint, timeout_s=60) as c:
            [w] = c.status()["workers"]
        assert w["pooled_units"] and w["pooled_weight_bytes"] > 0
    finally:
        assert f.stop() == 0
