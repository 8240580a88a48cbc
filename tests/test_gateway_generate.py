"""The HTTP gateway on a generation fleet (a tiny random GPT-2 with a real BPE tokenizer and a
chat template), behind API keys: the official `openai` package's completions, streamed or not,
and chat completions give the tokens and text the ZeroMQ client's generate gives; stop strings
end a completion where they begin; a key is required; a client that leaves a stream cancels its
job."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest
from test_batch_api import OVER, jsonl, rows, wait_for
from test_gateway import WAIT_S, assert_openai_error, call, queue_time

from baton.client import Client, Result
from baton.launch import REPO, Fleet
from baton.random_gpt2 import Shape, ensure
from broker.texts import Incremental, Texts

GPT2_CONFIG = REPO / "configs" / "gpt2.toml"
# many positions: a long generation outlasts a test's disconnect by far
SHAPE = Shape(layers=2, hidden=64, heads=2, vocab=512, tokenizer_vocab=512, positions=4096)
KEY, FILE_KEY = "sk-test-key", "sk-from-file"
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
PROMPT = "The queue holds every job until a worker"
GREEDY = {"max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = ensure(tmp_path_factory.mktemp("gpt2"), SHAPE)
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return model


@pytest.fixture(scope="module")
def fleet(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    model = checkpoint
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# one key a line\n{FILE_KEY}\n")
    sets = [
        "workers.threads=1",
        f"model.path={model}",
        f'gateway.api_keys=["{KEY}"]',
        f"gateway.api_key_file={keys}",
    ]
    f = Fleet(GPT2_CONFIG, sets, ready_timeout_s=240, gateway=True).start()
    try:
        yield f
    finally:
        assert f.stop() == 0


@pytest.fixture(scope="module")
def model(fleet: Fleet) -> str:
    [m] = oai(fleet).models.list().data
    return m.id


def oai(fleet: Fleet, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fleet.http}/v1", api_key=key, max_retries=0, timeout=WAIT_S)


def generate(fleet: Fleet, prompts: list, n: int = 12) -> list[Result]:
    async def go() -> list[Result]:
        async with Client(fleet.endpoint, timeout_s=WAIT_S) as c:
            return await c.generate(prompts, max_new_tokens=n, temperature=0.0, ignore_eos=True)

    results = asyncio.run(go())
    assert all(r.ok for r in results), [r.error for r in results]
    return results


def test_completion_equals_zeromq_generate(fleet: Fleet, model: str) -> None:
    ids = [5, 17, 200, 42, 9]
    want_text, want_ids = generate(fleet, [PROMPT, ids])
    got = oai(fleet).completions.create(model=model, prompt=PROMPT, **GREEDY)
    [choice] = got.choices
    assert (choice.text, choice.finish_reason) == (want_text.text, "length")
    assert got.usage.completion_tokens == len(want_text.token_ids) == 12
    assert got.usage.prompt_tokens == want_text.prompt_tokens
    by_ids = oai(fleet).completions.create(model=model, prompt=ids, **GREEDY)
    assert by_ids.choices[0].text == want_ids.text and by_ids.usage.prompt_tokens == len(ids)
    # several prompts: one choice each, in order
    both = oai(fleet).completions.create(model=model, prompt=[PROMPT, "Another"], **GREEDY)
    [other] = generate(fleet, ["Another"])
    assert [c.text for c in both.choices] == [want_text.text, other.text]
    assert [c.index for c in both.choices] == [0, 1]


def test_queue_time_counts_each_generate_job_once(fleet: Fleet, model: str) -> None:
    before, before_s = queue_time(fleet, KEY)
    t0 = time.monotonic()
    oai(fleet).completions.create(model=model, prompt=[PROMPT, "Another"], **GREEDY)
    list(oai(fleet).completions.create(model=model, prompt=PROMPT, stream=True, **GREEDY))
    generate(fleet, [[5, 17, 200]])
    elapsed = time.monotonic() - t0
    after, after_s = queue_time(fleet, KEY)
    assert after - before == 4  # jobs, streamed or not, each counted once
    assert 0 <= after_s - before_s <= 4 * elapsed


def test_streamed_completion_equals_zeromq_generate(fleet: Fleet, model: str) -> None:
    [want] = generate(fleet, [PROMPT])
    stream = oai(fleet).completions.create(
        model=model, prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    *texts, usage = chunks
    assert usage.choices == [] and usage.usage.completion_tokens == 12
    assert usage.usage.prompt_tokens == want.prompt_tokens
    assert "".join(c.choices[0].text for c in texts) == want.text
    assert [c.choices[0].finish_reason for c in texts][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in texts[:-1])


def test_stop_strings_end_the_text_where_they_begin(fleet: Fleet, model: str) -> None:
    [want] = generate(fleet, [PROMPT], n=40)
    text = want.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text[: text.find(stop)]
    args = {"max_tokens": 40, "temperature": 0, "extra_body": {"ignore_eos": True}}
    got = oai(fleet).completions.create(model=model, prompt=PROMPT, stop=[stop], **args)
    assert (got.choices[0].text, got.choices[0].finish_reason) == (cut, "stop")
    chunks = list(
        oai(fleet).completions.create(model=model, prompt=PROMPT, stop=stop, stream=True, **args)
    )
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_batch_line_ends_its_job_at_a_stop_string(fleet: Fleet, model: str) -> None:
    [want] = generate(fleet, [PROMPT], n=40)
    text = want.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text[: text.find(stop)]
    many = 2000  # what the job would make if the stop did not end it
    args = {"max_tokens": many, "temperature": 0, "stop": [stop]}
    route = oai(fleet).completions.create(
        model=model, prompt=PROMPT, extra_body={"ignore_eos": True}, **args
    )
    assert (route.choices[0].text, route.choices[0].finish_reason) == (cut, "stop")
    body = {"model": model, "prompt": PROMPT, "ignore_eos": True, **args}
    line = {"custom_id": "s", "method": "POST", "url": "/v1/completions", "body": body}
    client = oai(fleet)
    up = client.files.create(file=("b.jsonl", io.BytesIO(jsonl([line]))), purpose="batch")
    created = client.batches.create(
        input_file_id=up.id, endpoint="/v1/completions", completion_window="24h"
    )
    batch = wait_for(client, created.id, lambda b: b.status in OVER)
    assert batch.status == "completed", batch
    [row] = rows(client, batch.output_file_id)
    got = row["response"]["body"]
    # the route's text and end; the job was ended at the stop, not run to max_tokens
    assert (got["choices"][0]["text"], got["choices"][0]["finish_reason"]) == (cut, "stop")
    assert got["usage"]["prompt_tokens"] == route.usage.prompt_tokens
    # usage counts the tokens made until the stop appeared: enough for the text, far from many
    made = got["usage"]["completion_tokens"]
    assert len(generate(fleet, [PROMPT], n=made)[0].text) >= len(cut) and made < many


def test_chat_renders_the_checkpoints_template(fleet: Fleet, model: str) -> None:
    messages = [{"role": "user", "content": "Say hello"}]
    [want] = generate(fleet, ["user: Say hello\nassistant:"])
    got = oai(fleet).chat.completions.create(model=model, messages=messages, **GREEDY)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == want.prompt_tokens
    chunks = list(
        oai(fleet).chat.completions.create(model=model, messages=messages, stream=True, **GREEDY)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_api_keys_are_required(fleet: Fleet, model: str) -> None:
    body = {"model": model, "prompt": "x", "max_tokens": 1}
    for headers in ({}, {"Authorization": f"Bearer {KEY}x"}, {"Authorization": KEY}):
        got = call(fleet.http, "POST", "/v1/completions", body, headers)
        assert_openai_error(got, 401, "invalid_api_key")
    assert_openai_error(call(fleet.http, "GET", "/v1/models"), 401, "invalid_api_key")
    assert_openai_error(call(fleet.http, "GET", "/metrics"), 401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        oai(fleet, "wrong").models.list()
    assert call(fleet.http, "GET", "/health")[0] == 200  # the one open route
    for key in (KEY, FILE_KEY):
        got = call(fleet.http, "POST", "/v1/completions", body, {"Authorization": f"Bearer {key}"})
        assert got[0] == 200 and got[2]["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"n": 2}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"logprobs": 2}, "logprobs"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": ""}, "prompt"),  # the broker's empty_prompt
        ({"prompt": [1, 10**6]}, "prompt"),  # token_out_of_range
        ({"prompt": "x", "max_tokens": 5000}, "prompt"),  # past the positions: prompt_too_long
    ],
)
def test_bad_completion_requests_are_400(fleet: Fleet, model: str, extra: dict, param: str) -> None:
    body = {"model": model, "prompt": "x", "max_tokens": 2, **extra}
    got = call(fleet.http, "POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}"})
    assert assert_openai_error(got, 400)["param"] == param


def test_leaving_a_stream_cancels_its_job(fleet: Fleet, model: str) -> None:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4000, "stream": True}
    body |= {"temperature": 0, "ignore_eos": True}
    before = status(fleet)["jobs"]["cancelled"]
    url = urlsplit(fleet.http)
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    # a socket of the test's own, with no other descriptor holding it (http.client's response
    # object kept one open past close, and a half-closed socket takes the gateway's writes
    # silently): closed, the gateway's next write meets a reset
    with socket.create_connection((url.hostname, url.port), timeout=WAIT_S) as sock:
        sock.sendall(head.encode() + payload)
        seen = b""
        while b"data: {" not in seen:  # it is generating
            got = sock.recv(4096)
            assert got, seen
            seen += got
        assert seen.startswith(b"HTTP/1.1 200"), seen[:200]
    # gone mid-stream: the job must be cancelled, not run to 4,000 tokens
    deadline = time.monotonic() + WAIT_S
    while True:
        jobs = status(fleet)["jobs"]
        if jobs["cancelled"] > before and jobs["running"] == 0:
            break
        assert time.monotonic() < deadline, jobs
        time.sleep(0.1)  # polling the broker's counters, bounded by the deadline


def status(fleet: Fleet) -> dict:
    async def go() -> dict:
        async with Client(fleet.endpoint, timeout_s=WAIT_S) as c:
            return await c.status()

    return asyncio.run(go())


def test_incremental_text_is_the_whole_decode(checkpoint: Path) -> None:
    texts = Texts(checkpoint, checkpoint / "tokenizer.json")
    assert texts.tok is not None
    original = "naïve café: 東京 — ünïcödé, tokens split mid-character 🙂 and back"
    ids = texts.tok.encode(original).ids
    for step in (1, 2, 3):
        inc = Incremental(texts)
        seen = []
        for i in range(0, len(ids), step):
            seen.append(inc.add(ids[i : i + step]))
            assert "\ufffd" not in seen[-1]  # half a character is held back, never sent
            assert texts.decode(ids[: i + step]).startswith(seen[-1])
        assert seen[-1] == texts.decode(ids) == original
