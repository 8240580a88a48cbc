"""Generation through the whole fleet (broker, journal, controller, workers) against transformers:
every greedy token is its argmax, for every layout, with sequences joining while others are
mid-generation and prompts that share prefixes; seeded sampling independent of batch mates."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import start
from decoders import VOCAB, check_greedy, gpt2, llama

from baton.client import Client, Result
from baton.launch import Fleet

WAIT_S = 240
LAYOUTS = [
    ("llama", 1, 1),
    ("llama", 1, 2),
    ("llama", 2, 1),
    ("llama", 2, 2),
    ("gpt2", 1, 1),
    ("gpt2", 1, 2),
    ("gpt2", 2, 1),
    ("gpt2", 2, 2),
]
# small blocks and a small token budget, so that prompts span several blocks and long ones are
# prefilled in chunks
DECODER = ["kv.block_size=4", "batching.max_batch_tokens=48", "kv.memory=4000000"]

SHARED = [7, 3, 19, 44, 2, 81, 9, 15, 60, 22, 5, 31, 70, 8, 12, 4]  # four blocks of 4


def prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts of 1 to 60 tokens; every third starts with SHARED (a shared prefix)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        own = [rng.randrange(VOCAB - 1) for _ in range(rng.randint(1, 40))]
        out.append(SHARED + own if i % 3 == 0 else own)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "gpt2": gpt2(tmp_path_factory.mktemp("gpt2")),
        "llama": llama(tmp_path_factory.mktemp("llama")),
    }


@pytest.fixture(scope="module", params=LAYOUTS, ids=[f"{m}-tp{t}-pp{p}" for m, t, p in LAYOUTS])
def fleet(
    request: pytest.FixtureRequest, checkpoints: dict[str, Path]
) -> Iterator[tuple[Fleet, Path]]:
    family, tp, pp = request.param
    f = start(
        f"model.path={checkpoints[family]}",
        f"parallel.tensor={tp}",
        f"parallel.pipeline={pp}",
        *DECODER,
        # the compiled decode attention on one worker; the eager one on several (each worker
        # compiles on its own, which would cost this file a minute on two cores)
        f"kv.compile={'true' if tp * pp == 1 else 'false'}",
    )
    try:
        yield f, checkpoints[family]
    finally:
        assert f.stop() == 0


async def joining(
    client: Client, first: list[list[int]], later: list[list[int]], n: int
) -> list[Result]:
    """`first` streaming; once each has made a token, `later` joins them mid-generation."""
    streams = [client.generate_stream(p, max_new_tokens=n, ignore_eos=True) for p in first]
    started = [await anext(s) for s in streams]  # every first job is now mid-generation
    joined = await client.generate(later, max_new_tokens=n, ignore_eos=True)
    results = []
    for head, stream in zip(started, streams, strict=True):
        tokens = list(head.token_ids)
        async for delta in stream:
            tokens += delta.token_ids
            if delta.result is not None:
                assert delta.result.token_ids == tokens  # the stream is the result, in order
                results.append(delta.result)
    return results + joined


def test_greedy_matches_transformers(fleet: tuple[Fleet, Path]) -> None:
    f, checkpoint = fleet
    first, later = prompts(4, seed=1), prompts(12, seed=2)

    async def go() -> list[Result]:
        async with Client(f.endpoint, timeout_s=WAIT_S) as client:
            return await joining(client, first, later, 20)

    results = asyncio.run(go())
    for prompt, r in zip(first + later, results, strict=True):
        assert r.ok, r.error
        assert (r.finish_reason, r.prompt_tokens, len(r.token_ids)) == ("length", len(prompt), 20)
        check_greedy(checkpoint, prompt, r.token_ids)


def test_prefix_blocks_are_shared(fleet: tuple[Fleet, Path]) -> None:
    f, checkpoint = fleet

    async def go() -> tuple[list[Result], dict]:
        async with Client(f.endpoint, timeout_s=WAIT_S) as client:
            results = await client.generate(
                [SHARED + [k, k + 1] for k in range(10)], max_new_tokens=4, ignore_eos=True
            )
            return results, await client.status()

    results, status = asyncio.run(go())
    for k, r in enumerate(results):
        check_greedy(checkpoint, SHARED + [k, k + 1], r.token_ids)
    kv = [c["stats"]["kv"] for c in status["controllers"]]
    assert kv and kv[0]["prefix_hits_tokens"] >= 9 * len(SHARED)
    assert kv[0]["blocks_used"] == 0  # every finished sequence gave its blocks back


def test_seeded_sampling_ignores_batch_mates(fleet: tuple[Fleet, Path]) -> None:
    f, _ = fleet
    probe = prompts(1, seed=5)[0]
    params = {"max_new_tokens": 12, "temperature": 0.9, "top_k": 20, "top_p": 0.95, "seed": 42}

    async def go() -> tuple[Result, list[Result]]:
        async with Client(f.endpoint, timeout_s=WAIT_S) as client:
            [alone] = await client.generate([probe], ignore_eos=True, **params)
            crowd = await client.generate(
                [*prompts(6, seed=6), probe, *prompts(6, seed=7)], ignore_eos=True, **params
            )
            return alone, crowd

    alone, crowd = asyncio.run(go())
    assert alone.ok and alone.token_ids == crowd[6].token_ids
    assert len({tuple(r.token_ids) for r in crowd}) > 1  # the seed is not a greedy in disguise
