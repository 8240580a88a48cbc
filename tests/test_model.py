"""Single-process model checks against sentence-transformers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from corpus import MODEL, reference, sentence_transformer, texts
from safetensors import safe_open
from safetensors.torch import save_file

from controller.config import ConfigError, check_model, load
from workers import packing
from workers.layers.attention import Context
from workers.layers.parallel import TPGroup
from workers.loader import View, resolve_model_dir, tensors
from workers.models import build, load_info, plan, split_layers
from workers.runner import use_packed_kernels
from workers.tokenizer import Tokenizer

MIN_COSINE = 0.9999
SOLO = TPGroup(0, 1, None)


@pytest.fixture(scope="module")
def info():
    return load_info(MODEL)


@pytest.fixture(scope="module")
def corpus():
    return texts(60)


@pytest.fixture(scope="module")
def encoded(info, corpus):
    return Tokenizer(info).encode(corpus)


@pytest.fixture(scope="module")
def expected(corpus):
    return reference(corpus)


@pytest.fixture(scope="module", params=["flash", "kernel"])
def attention(request) -> str:
    """Encoder attention by torch's flash kernel (per distinct length) or by the C++ kernel."""
    return request.param


def built(info, stage: int, pipeline: int, attention: str) -> torch.nn.Module:
    model = build(info, stage, pipeline, SOLO)
    if attention == "kernel":
        assert use_packed_kernels(model, torch.device("cpu"), torch.float32), "no C++ kernel"
    return model


@pytest.fixture(scope="module")
def model(info, attention):
    return built(info, 0, 1, attention)


def run(stages: list, seqs: list[list[int]], padded: bool = False) -> torch.Tensor:
    x, seq_lens = packing.pack(seqs)
    ctx = Context.encoder(seq_lens, padded, torch.device("cpu"))
    with torch.inference_mode():
        for stage in stages:
            x = stage(x, ctx)
    return x


def test_info(info):
    assert info.name == "all-MiniLM-L6-v2"
    assert (info.hidden_size, info.num_layers, info.num_heads) == (384, 6, 12)
    assert (info.intermediate_size, info.vocab_size, info.max_position) == (1536, 30522, 512)
    assert info.max_seq_length == 256
    assert info.extra["pooling"] == "mean" and info.extra["normalize"]
    assert info.hidden_act == "gelu" and info.norm_eps == 1e-12
    assert info.family == "bert" and not info.decoder


def test_bad_model_dirs(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        resolve_model_dir(str(tmp_path))
    with pytest.raises(ValueError, match="cannot import"):
        resolve_model_dir("package:no_such_package_here")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="t5"):
        load_info(str(tmp_path))


def test_tokenizer_matches_sentence_transformers(corpus, encoded):
    hf = sentence_transformer().tokenizer
    truncated = hf(corpus, truncation=True, max_length=256, padding=False)["input_ids"]
    full = hf(corpus, truncation=False, padding=False, verbose=False)["input_ids"]
    assert [e.ids for e in encoded] == truncated
    assert [e.truncated for e in encoded] == [len(ids) > 256 for ids in full]
    assert sum(e.truncated for e in encoded) >= 3
    assert min(len(e.ids) for e in encoded) <= 4


@pytest.mark.parametrize("pipeline", [1, 2, 3])
def test_matches_sentence_transformers(info, encoded, expected, pipeline, attention):
    stages = [built(info, i, pipeline, attention) for i in range(pipeline)]
    got = run(stages, [e.ids for e in encoded])
    assert got.shape == expected.shape
    cosine = F.cosine_similarity(got, expected)
    assert cosine.min().item() >= MIN_COSINE, cosine
    assert torch.allclose(got.norm(dim=1), torch.ones(len(got)), atol=1e-5)


def test_batch_independence(model, encoded):
    seqs = [e.ids for e in encoded]
    together = run([model], seqs)
    picks = sorted({0, len(seqs) - 1, max(range(len(seqs)), key=lambda i: len(seqs[i]))})
    picks.append(min(range(len(seqs)), key=lambda i: len(seqs[i])))
    for i in picks:
        alone = run([model], [seqs[i]])[0]
        assert (alone - together[i]).abs().max().item() <= 1e-5, i


def test_padded_matches_packed(info, model, encoded, attention):
    seqs = [e.ids for e in encoded]
    assert (run([model], seqs, padded=True) - run([model], seqs)).abs().max().item() <= 1e-5
    # A middle stage returns packed hidden states, which must agree too.
    middle = built(info, 0, 3, attention)  # two layers, no pooling
    diff = (run([middle], seqs, padded=True) - run([middle], seqs)).abs().max().item()
    assert diff <= 1e-4


def views(directory) -> dict[str, View]:
    return {name: View(handle, name) for handle, name in tensors(directory)}


def test_checkpoint_views(info):
    ckpt = views(info.path)
    for name, dim, shards in [
        ("encoder.layer.0.attention.self.query.weight", 0, 2),
        ("encoder.layer.3.intermediate.dense.weight", 0, 4),
        ("encoder.layer.5.output.dense.weight", 1, 3),
        ("encoder.layer.5.output.dense.weight", -1, 2),
        ("encoder.layer.1.intermediate.dense.bias", 0, 6),
    ]:
        full = ckpt[name].read()
        parts = [ckpt[name].shard(dim, s, shards) for s in range(shards)]
        size = full.shape[dim] // shards
        for s, part in enumerate(parts):
            assert torch.equal(part, full.narrow(dim, s * size, size))
        assert torch.equal(torch.cat(parts, dim=dim), full)
    with pytest.raises(ValueError):
        ckpt["encoder.layer.0.attention.self.query.weight"].shard(0, 0, 5)


def test_transposed_view(tmp_path):
    # GPT-2 stores linear weights [in, out]; a transposed view reads them as [out, in] slices
    weight = torch.arange(12, dtype=torch.float32).view(4, 3)
    save_file({"w": weight}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        view = View(handle, "w", transposed=True)
        check_transposed(view, weight)


def check_transposed(view: View, weight: torch.Tensor) -> None:
    assert view.shape == [3, 4]
    assert torch.equal(view.read(), weight.t())
    assert torch.equal(view.shard(0, 1, 3), weight.t()[1:2])
    assert torch.equal(view.shard(1, 1, 2), weight.t()[:, 2:])


def test_split_layers():
    assert split_layers(6, 1) == [range(0, 6)]
    assert split_layers(6, 2) == [range(0, 3), range(3, 6)]
    assert split_layers(6, 4) == [range(0, 1), range(1, 2), range(2, 4), range(4, 6)]
    assert split_layers(6, 6) == [range(i, i + 1) for i in range(6)]
    for n in range(1, 13):
        for p in range(1, n + 1):
            ranges = split_layers(n, p)
            assert [i for r in ranges for i in r] == list(range(n))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    for bad in (0, 7, -1):
        with pytest.raises(ValueError):
            split_layers(6, bad)


def test_split_layers_balances_the_lm_head():
    # a head worth about 4 layers: the last of 2 stages takes 2 of 8 layers, not 4
    assert split_layers(8, 2, 4.1) == [range(0, 6), range(6, 8)]
    assert split_layers(8, 4, 4.1) == [range(0, 2), range(2, 4), range(4, 7), range(7, 8)]
    assert split_layers(2, 2, 9.0) == [range(0, 1), range(1, 2)]  # every stage keeps a layer
    for n in range(1, 13):
        for p in range(1, n + 1):
            for head in (0.3, 1.0, 2.5, 20.0):
                ranges = split_layers(n, p, head)
                assert [i for r in ranges for i in r] == list(range(n))
                assert min(map(len, ranges)) >= 1
                work = [len(r) for r in ranges]
                work[-1] += head if p > 1 else 0
                even = [len(r) for r in split_layers(n, p)]
                even[-1] += head if p > 1 else 0
                assert max(work) <= max(even)  # never worse than the even split


def test_plan_takes_the_configured_stages_or_plans_them():
    info = load_info(MODEL)  # 6 layers, an encoder: no head to balance
    assert plan(info, 2) == [range(0, 3), range(3, 6)]
    assert plan(info, 2, [4, 2]) == [range(0, 4), range(4, 6)]
    assert plan(info, 3, [1, 1, 4]) == [range(0, 1), range(1, 2), range(2, 6)]
    with pytest.raises(ConfigError, match="parallel.stages"):
        check_model(load(None, ["parallel.pipeline=2", "parallel.stages=[4,1]"]), info)
    with pytest.raises(ConfigError, match="parallel.stages"):
        check_model(load(None, ["parallel.pipeline=2", "parallel.stages=[6,0]"]), info)
    check_model(load(None, ["parallel.pipeline=2", "parallel.stages=[5,1]"]), info)


def test_packing():
    seqs = [[5, 6, 7], [8], [9, 10]]
    ids, seq_lens = packing.pack(seqs)
    assert ids.dtype == torch.int64 and ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert seq_lens == [3, 1, 2]
    assert packing.offsets(seq_lens) == [0, 3, 4, 6]
    assert packing.positions(seq_lens, "cpu").tolist() == [0, 1, 2, 0, 0, 1]
    x = torch.arange(12.0).view(6, 2)
    padded = packing.pad(x, seq_lens)
    assert padded.shape == (3, 3, 2)
    assert padded[1, 1:].abs().sum() == 0 and torch.equal(padded[2, :2], x[4:])
    assert torch.equal(packing.unpad(padded, seq_lens), x)
