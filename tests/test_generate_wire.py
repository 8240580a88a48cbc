"""The generate step as the workers get it: tokens, slots, block tables, sample rows, sizes."""

from __future__ import annotations

import torch

from controller.block_manager import BlockManager
from controller.pipeline import generate_message, largest_messages
from controller.scheduler import Scheduler
from controller.sequence import SamplingParams, Sequence
from wire.protocol import Kind, Limits, decode, encode


def gen(sid: str, tokens: list[int], **kw: object) -> Sequence:
    params = SamplingParams(**kw)  # type: ignore[arg-type]
    return Sequence(sid, "generate", tokens, params=params, oneshot=False)


def test_a_step_names_every_slot_and_block() -> None:
    s = Scheduler(7, 0, BlockManager(16, 4))
    a = gen("a", [10, 11, 12], temperature=0.5, top_k=3, top_p=0.9, seed=42)
    b = gen("b", list(range(20, 30)))
    s.add([a, b])
    batch = s.schedule()
    assert batch.seq_lens == [3, 4] and batch.sample == [0]  # b is cut at the budget
    body, (x, slots, tables) = generate_message(5, batch, 4)
    assert body == {
        "batch": 5,
        "ref": 5,
        "task": "generate",
        "seq_lens": [3, 4],
        "context_lens": [3, 4],
        "sample": [[0, 0.5, 3, 0.9, 42, 0]],
    }
    assert x.tolist() == [10, 11, 12, 20, 21, 22, 23]
    ta, tb = a.block_table, b.block_table
    assert slots.tolist() == [ta[0] * 4 + i for i in range(3)] + [tb[0] * 4 + i for i in range(4)]
    assert tables.dtype == torch.int32 and tables.tolist() == [[ta[0]], [tb[0]]]
    s.postprocess(batch, [13])
    batch = s.schedule()  # a decodes its token 13 at position 3; b's rest of the prompt
    body, (x, slots, tables) = generate_message(6, batch, 4)
    assert body["seq_lens"] == [1, 6] and body["context_lens"] == [4, 10]
    assert body["sample"] == [[0, 0.5, 3, 0.9, 42, 1], [1, 0.0, 0, 1.0, -1, 0]]
    assert x.tolist() == [13, *range(24, 30)]
    assert slots.tolist()[0] == ta[0] * 4 + 3
    assert slots.tolist()[1:] == [tb[p // 4] * 4 + p % 4 for p in range(4, 10)]
    assert tables.tolist() == [[ta[0], -1, -1], tb[:3]]


def test_the_largest_generate_message_is_an_upper_bound() -> None:
    tokens, hidden, positions, bs = 64, 32, 128, 16
    [*hops] = largest_messages(tokens, positions, 1, hidden, torch.float32, 2, (positions, bs))
    sizes = {h.name: h.size for h in hops}
    # a real worst step: 64 decodes, every one sampling with a seed, long contexts
    s = Scheduler(tokens, 0, BlockManager(tokens * positions // bs, bs))
    seqs = [
        gen(f"s{i}", [1] * (positions - 2), max_new_tokens=99, temperature=0.7, seed=2**63 - 1)
        for i in range(tokens)
    ]
    s.add(seqs)
    s.budget = tokens * positions  # every prompt in one step (no position passes the model's)
    batch = s.schedule()
    s.postprocess(batch, [3] * len(batch.sample))
    s.budget = tokens
    batch = s.schedule()
    assert batch.seq_lens == [1] * tokens and len(batch.sample) == tokens
    body, tensors = generate_message(2**64 - 1, batch, bs)
    sent = encode(Kind.BATCH, body, tensors)
    assert sum(len(f) for f in sent) <= sizes["to stage 0"]
    msg = decode(sent, Limits(1 << 30))
    forwarded = encode(Kind.BATCH, msg.body, [torch.zeros(tokens, hidden), *tensors[1:]])
    assert sum(len(f) for f in forwarded) <= sizes["from stage 0 to stage 1"]
    out = encode(Kind.OUTPUT, {"batch": 2**64 - 1, "ref": 2**64 - 1, "token_ids": [50256] * 64})
    assert sum(len(f) for f in out) <= sizes["from stage 1 to the controller"]
