"""Embeddings through the whole fleet equal sentence-transformers' for every TP x PP layout."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import pytest
import torch
from conftest import start
from corpus import reference, texts

from baton.client import BlockingClient
from baton.launch import Fleet

LAYOUTS = [(1, 1), (1, 2), (2, 1), (2, 2)]
N = 200


@lru_cache(maxsize=1)
def corpus() -> tuple[list[str], torch.Tensor]:
    chosen = [t for t in texts(N + 20, seed=1) if t.strip()][:N]
    return chosen, reference(chosen)


@pytest.fixture(scope="module", params=LAYOUTS, ids=[f"tp{t}-pp{p}" for t, p in LAYOUTS])
def fleet(request: pytest.FixtureRequest) -> Iterator[Fleet]:
    tp, pp = request.param
    f = start(f"parallel.tensor={tp}", f"parallel.pipeline={pp}", "batching.max_batch_tokens=2048")
    try:
        yield f
    finally:
        assert f.stop() == 0


def embed(fleet: Fleet, batch: list[str]) -> torch.Tensor:
    with BlockingClient(fleet.endpoint, timeout_s=300) as client:
        results = client.embed(batch)
    assert all(r.status == "ok" for r in results), [r.error for r in results if r.status != "ok"]
    return torch.tensor([r.embedding for r in results])


def test_matches_sentence_transformers(fleet: Fleet) -> None:
    chosen, ref = corpus()
    assert len(chosen) == N
    with BlockingClient(fleet.endpoint, timeout_s=300) as client:
        results = client.embed(chosen)
    assert [r.status for r in results] == ["ok"] * N
    got = torch.tensor([r.embedding for r in results])
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
    worst = int(cos.argmin())
    assert cos.min() >= 0.9999, f"text {worst} ({chosen[worst][:60]!r}): cosine {cos.min():.6f}"
    long = [r for r in results if r.truncated]
    assert long and all(r.tokens == 256 for r in long)  # some texts ran past max_seq_length


def test_batch_does_not_change_an_embedding(fleet: Fleet) -> None:
    chosen, _ = corpus()
    probe = chosen[7]
    alone = embed(fleet, [probe])[0]
    # many others of other lengths, submitted at once so they share micro-batches with the probe
    crowd = [*chosen[20:60], probe, *chosen[60:100]]
    among = embed(fleet, crowd)[40]
    assert (alone - among).abs().max() <= 1e-5
