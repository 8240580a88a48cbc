"""Generation under pressure: a KV cache too small for the load (preemption), cancellation mid-
stream and at random through 1,000 jobs (no block leaked), and a worker SIGKILLed mid-generation
(every job ends ok with the tokens of an undisturbed run)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import start
from decoders import VOCAB, check_greedy, llama

from baton.client import Client, Result
from baton.launch import Fleet

WAIT_S = 240
# Llama's K/V here: 4 layers x 1 head x 16 dims x 2 x 4 bytes = 512 bytes a token, so 24 KiB is
# 12 blocks of 4 tokens: three or four sequences at a time
TINY_KV = ["kv.block_size=4", "kv.memory=24576", "batching.max_batch_tokens=32"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def tiny(checkpoint: Path) -> Iterator[Fleet]:
    f = start(f"model.path={checkpoint}", *TINY_KV)
    try:
        yield f
    finally:
        assert f.stop() == 0


def prompt(rng: random.Random, most: int) -> list[int]:
    return [rng.randrange(VOCAB - 1) for _ in range(rng.randint(1, most))]


async def kv_settled(client: Client) -> dict:
    """The controller's KV figures once no block is in use: they come with its results and its
    reports (every heartbeat), so this waits for the next report at most."""
    deadline = time.monotonic() + 30
    while True:
        kv = (await client.status())["controllers"][0]["stats"]["kv"]
        if kv["blocks_used"] == 0 or time.monotonic() > deadline:
            return kv
        await asyncio.sleep(0.1)  # between status requests; the bound is the deadline above


def test_preemption_keeps_tokens_right(tiny: Fleet, checkpoint: Path) -> None:
    rng = random.Random(11)
    prompts = [prompt(rng, 20) for _ in range(8)]

    async def go() -> tuple[list[Result], dict]:
        async with Client(tiny.endpoint, timeout_s=WAIT_S) as client:
            results = await client.generate(prompts, max_new_tokens=16, ignore_eos=True)
            return results, (await client.status())["controllers"][0]["stats"]

    results, stats = asyncio.run(go())
    for p, r in zip(prompts, results, strict=True):
        assert r.ok, r.error
        check_greedy(checkpoint, p, r.token_ids)
    assert stats["preemptions"] > 0  # the cache could not hold them all: some were recomputed


def test_cancel_mid_stream_and_no_block_leaks(tiny: Fleet) -> None:
    rng = random.Random(12)

    async def go() -> tuple[list[Result], dict, int]:
        async with Client(tiny.endpoint, timeout_s=WAIT_S) as client:
            # one streamed job cancelled after its first tokens: its stream ends, cancelled
            stream = client.generate_stream(prompt(rng, 8), max_new_tokens=40, ignore_eos=True)
            first = await anext(stream)
            await client.cancel([first.id])
            tail = [d async for d in stream]
            assert tail and tail[-1].result is not None and not tail[-1].result.ok
            assert tail[-1].result.error["code"] == "cancelled"
            streamed = len(first.token_ids) + sum(len(d.token_ids) for d in tail)
            assert streamed < 40
            # 1,000 mixed jobs; a quarter cancelled while queued or generating
            jobs = [
                {
                    "id": f"mix-{i}",
                    "task": "generate",
                    "token_ids": prompt(rng, 24),
                    "max_new_tokens": rng.randint(1, 12),
                    "ignore_eos": rng.random() < 0.5,
                    **({"temperature": 0.8, "seed": i} if i % 3 == 0 else {}),
                }
                for i in range(1000)
            ]
            futures = await client.submit(jobs)
            doomed = [j["id"] for j in jobs if rng.random() < 0.25]
            for k in range(0, len(doomed), 50):
                await client.cancel(doomed[k : k + 50])
                await asyncio.wait(futures[:1], timeout=0.05)  # spread the cancels over the run
            results = await asyncio.wait_for(asyncio.gather(*futures), WAIT_S)
            return results, await kv_settled(client), len(doomed)

    results, kv, doomed = asyncio.run(go())
    codes = [r.error["code"] for r in results if not r.ok]
    assert set(codes) <= {"cancelled"} and 0 < len(codes) <= doomed
    assert all(r.finish_reason in ("length", "stop") for r in results if r.ok)
    assert kv["blocks_used"] == 0 and kv["blocks_free"] == kv["blocks_total"]


@pytest.fixture
def piped(checkpoint: Path) -> Iterator[Fleet]:
    f = start(
        f"model.path={checkpoint}",
        "parallel.pipeline=2",
        "kv.block_size=4",
        "kv.memory=4000000",
        "batching.max_batch_tokens=64",
        "workers.dead_after_ms=5000",
        "kv.compile=false",  # two workers compiling at each start: time this file can spare
    )
    try:
        yield f
    finally:
        f.stop()


def test_sigkill_a_worker_mid_generation(piped: Fleet, checkpoint: Path) -> None:
    rng = random.Random(13)
    prompts = [prompt(rng, 30) for _ in range(12)]
    greedy = {"max_new_tokens": 90, "ignore_eos": True}
    seeded = {**greedy, "temperature": 1.0, "top_k": 30, "seed": 5}

    async def go() -> tuple[list[Result], list[Result], list[Result], dict]:
        async with Client(piped.endpoint, timeout_s=WAIT_S) as client:
            stream = client.generate_stream(prompts[0], **greedy)
            first = await anext(stream)  # generation is under way
            futures = await client.submit(
                [{"task": "generate", "token_ids": p, **greedy} for p in prompts[1:6]]
                + [{"task": "generate", "token_ids": p, **seeded} for p in prompts[6:]]
            )
            workers = (await client.status())["workers"]
            os.kill(workers[-1]["pid"], signal.SIGKILL)  # the last stage, steps in flight
            streamed = list(first.token_ids)
            async for d in stream:
                streamed += d.token_ids
                head = d.result
            struck = [head, *await asyncio.wait_for(asyncio.gather(*futures), WAIT_S)]
            assert streamed == head.token_ids  # the stream went on where it was, no repeats
            # the seeded jobs again, undisturbed, on the restarted replica
            again = await client.generate(prompts[6:], **seeded)
            return struck[:6], struck[6:], again, await client.status()

    greedy_results, seeded_results, again, status = asyncio.run(go())
    for p, r in zip(prompts[:6], greedy_results, strict=True):
        assert r.ok, r.error
        check_greedy(checkpoint, p, r.token_ids)
    assert [r.token_ids for r in seeded_results] == [r.token_ids for r in again]
    assert all(r.ok and len(r.token_ids) == 90 for r in seeded_results)
    assert all(w["restarts"] == 1 for w in status["workers"])
