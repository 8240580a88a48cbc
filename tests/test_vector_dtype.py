"""An embed job's `dtype: "float16"`: its vector is rounded once at the broker and kept,
journaled and sent in float16 (half the bytes), beside float32 jobs in the same `results`
message; the same values as the float32 vector rounded by torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import zmq.asyncio
from test_embed_ids import check, encoder_broker
from test_gateway import TEXTS

from baton.client import BlockingClient
from baton.launch import Fleet
from wire.protocol import Code, Kind, ProtocolError, encode

# --- at the door ---


def test_float16_is_an_embed_jobs_option_float32_its_default() -> None:
    assert check(text="a", dtype="float16").params == {"dtype": "float16"}
    assert check(text="a", dtype="float16").wire()["params"] == {"dtype": "float16"}
    # a job that does not ask is as it was: no params in the journal or on the wire
    assert check(text="a", dtype="float32").params is None
    assert "params" not in check(token_ids=[1, 2]).wire()
    assert check(token_ids=[1, 2], dtype="float16").vector_dtype == torch.float16
    assert check(text="a").vector_dtype == torch.float32


@pytest.mark.parametrize("dtype", ["bfloat16", "float64", "half", 16, None, ["float16"]])
def test_other_dtypes_are_refused(dtype: Any) -> None:
    with pytest.raises(ProtocolError) as e:
        check(text="a", dtype=dtype)
    assert e.value.code == Code.BAD_FIELD and "'dtype'" in e.value.message


def test_only_embed_jobs_take_a_dtype() -> None:
    with pytest.raises(ProtocolError) as e:
        check(task="echo", text="a", dtype="float16")
    assert e.value.code == Code.BAD_FIELD and "dtype" in e.value.message


# --- at the broker: rounded once, kept through a restart, two tensors in one message ---


def rows_of(msg: Any) -> dict[str, torch.Tensor]:
    """Each ok entry's vector, by job id, from the tensor (and row) it names."""
    return {
        e["id"]: msg.tensors[e.get("tensor", 0)][e["row"]]
        for e in msg.body["results"]
        if "row" in e
    }


async def test_the_broker_rounds_keeps_and_sends_float16_beside_float32(tmp_path: Path) -> None:
    vecs = torch.randn(3, 384, dtype=torch.float32)
    jobs = [
        {"id": "a32", "task": "embed", "text": "one"},
        {"id": "b16", "task": "embed", "text": "two", "dtype": "float16"},
        {"id": "c32", "task": "embed", "text": "three", "dtype": "float32"},
    ]
    want = {"a32": vecs[0], "b16": vecs[1].to(torch.float16), "c32": vecs[2]}
    ctx = zmq.asyncio.Context()
    try:
        async with encoder_broker(tmp_path, ctx) as (ctl, client):
            assert await client.submit(*jobs) == ["a32", "b16", "c32"]
            sent = await ctl.take(3)
            assert [j.get("params") for j in sent] == [None, {"dtype": "float16"}, None]
            entries = [
                {"id": j["id"], "status": "ok", "tokens": 3, "truncated": False, "row": k}
                for k, j in enumerate(sent)
            ]
            await ctl.sock.send_multipart(
                encode(Kind.RESULTS, {"results": entries, "stats": {}, "epoch": 1}, [vecs])
            )
            msg = await client.hear(Kind.RESULTS)
            assert [t.dtype for t in msg.tensors] == [torch.float32, torch.float16]
            got = rows_of(msg)
            assert got.keys() == want.keys()
            for jid, vec in want.items():
                assert got[jid].dtype == vec.dtype and torch.equal(got[jid], vec), jid
        # a broker started on the same journal gives the same bytes back, and holds the
        # float16 job to its dtype: asked again as float32 it is another job
        async with encoder_broker(tmp_path, ctx) as (_, client):
            assert await client.submit(*jobs) == ["a32", "b16", "c32"]
            msg = await client.hear(Kind.RESULTS)
            got = rows_of(msg)
            for jid, vec in want.items():
                assert got[jid].dtype == vec.dtype and torch.equal(got[jid], vec), jid
            assert await client.submit({**jobs[1], "dtype": "float32"}) == []
            [refused] = (await client.hear(Kind.RESULTS)).body["results"]
            assert refused["error"]["code"] == Code.DUPLICATE_ID
    finally:
        ctx.destroy(0)


# --- through a fleet and the Python client ---


def test_a_fleet_sends_float16_vectors_that_equal_float32_ones_rounded(
    small_fleet: Fleet,
) -> None:
    jobs = [
        {"id": f"v16-{k}-{dtype}", "task": "embed", "text": t, "dtype": dtype}
        for k, t in enumerate(TEXTS)
        for dtype in ("float32", "float16")
    ]
    with BlockingClient(small_fleet.endpoint, timeout_s=120) as client:
        results = client.submit(jobs)
    assert all(r.ok for r in results), [r.error for r in results]
    for r32, r16 in zip(results[::2], results[1::2], strict=True):
        want = torch.tensor(r32.embedding, dtype=torch.float32).to(torch.float16)
        assert r16.embedding == want.tolist() and r16.tokens == r32.tokens
