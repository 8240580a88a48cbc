"""The scheduler: one-shot batches (embed, echo) and iteration-level generate steps."""

from __future__ import annotations

import asyncio
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.block_manager import BlockManager
from controller.scheduler import MicroBatch, Scheduler
from controller.sequence import SamplingParams, Sequence, Status


def item(jid: str, n: int, **kw: object) -> Sequence:
    return Sequence(jid, kw.pop("task", "embed"), list(range(n)), **kw)


def ids(batch: MicroBatch | None) -> list[str]:
    return [s.id for s in batch.seqs] if batch is not None else []


async def test_scheduler_batches_by_budget_task_and_suspicion() -> None:
    s = Scheduler(max_batch_tokens=10, max_wait_ms=0)
    s.add([item("a", 4), item("b", 4), item("c", 4), item("e1", 0, task="echo"), item("d", 3)])
    assert ids(s.take()) == ["a", "b"]  # budget
    assert ids(s.take()) == ["c"]  # a task change ends a batch
    assert ids(s.take()) == ["e1"]
    s.requeue([item("x", 1, attempts=1), item("y", 1, attempts=1)])
    assert ids(s.take()) == ["x"]  # a job that was in a lost batch runs alone
    assert ids(s.take()) == ["y"]
    s.add([item("old", 2, deadline=1.0), item("new", 2)])
    assert ids(s.take()) == ["d", "new"] and [i.id for i in s.late] == ["old"]
    assert s.drop({"nothing"}) == [] and s.tokens == 0


async def test_scheduler_waits_for_a_fuller_batch_only_while_busy() -> None:
    s = Scheduler(max_batch_tokens=100, max_wait_ms=60_000)
    s.add([item("a", 5)])
    assert ids(await asyncio.wait_for(s.next(lambda: True), 5)) == ["a"]  # idle: go
    s.add([item("b", 5)])
    busy = asyncio.create_task(s.next(lambda: False))
    s.add([item("c", 95)])  # the budget is reached: the batch leaves without waiting out max_wait
    assert ids(await asyncio.wait_for(busy, 5)) == ["b", "c"]


async def test_only_late_jobs_at_the_head_do_not_stall_the_queue() -> None:
    s = Scheduler(max_batch_tokens=10, max_wait_ms=0)
    s.add([item("late", 2, deadline=1.0), item("e", 0, task="echo")])
    assert ids(await asyncio.wait_for(s.next(lambda: True), 5)) == ["e"]
    assert [i.id for i in s.late] == ["late"]


def gen(sid: str, n: int, max_new: int = 4, first: int = 0, **kw: object) -> Sequence:
    params = SamplingParams(max_new_tokens=max_new, **kw)  # type: ignore[arg-type]
    return Sequence(sid, "generate", list(range(first, first + n)), params=params, oneshot=False)


def scheduler(
    budget: int, blocks: int, block_size: int, eos: int | None = None, groups: int = 1
) -> Scheduler:
    return Scheduler(budget, 0, BlockManager(blocks, block_size), eos_token_id=eos, groups=groups)


def back(s: Scheduler, batch: MicroBatch, token: int = 7) -> list[Sequence]:
    """The step came back from the last stage, every sampling row with `token`."""
    _, finished = s.postprocess(batch, [token] * len(batch.sample))
    return finished


def test_a_long_prompt_is_prefilled_in_chunks_within_the_budget() -> None:
    s = scheduler(budget=8, blocks=16, block_size=4)
    a = gen("a", 20, max_new=2)
    s.add([a])
    chunks = []
    while True:
        batch = s.schedule()
        assert batch is not None and batch.num_tokens <= 8
        chunks.append((batch.seq_lens, batch.sample))
        back(s, batch)
        if a.num_completion_tokens:
            break
    assert chunks == [([8], []), ([8], []), ([4], [0])]  # only the last chunk samples
    assert a.num_cached_tokens == 20 and a.num_tokens == 21
    batch = s.schedule()
    assert batch is not None and batch.seq_lens == [1] and batch.sample == [0]
    assert back(s, batch) == [a] and a.finish_reason == "length"
    assert a.completion_token_ids == [7, 7]
    assert s.bm.stats()["blocks_used"] == 0 and not s.running


def test_decodes_go_first_and_new_prompts_join_mid_generation() -> None:
    s = scheduler(budget=6, blocks=32, block_size=4)
    a = gen("a", 3, max_new=10)
    s.add([a])
    back(s, s.schedule())  # a's prefill
    b = gen("b", 9, max_new=10, first=100)
    c = gen("c", 2, max_new=10, first=200)
    s.add([b, c])
    batch = s.schedule()
    assert ids(batch) == ["a", "b"] and batch.seq_lens == [1, 5] and batch.sample == [0]
    back(s, batch)
    batch = s.schedule()
    # decodes first, then b's last chunk, then c admitted with what is left of the budget
    assert ids(batch) == ["a", "b", "c"] and batch.seq_lens == [1, 4, 1]
    assert batch.sample == [0, 1]  # c's single token of 2 is not the end of its prompt


def test_sequences_in_flight_are_not_scheduled_again() -> None:
    # two groups (two pipeline stages): b steps while a's step is inside
    s = scheduler(budget=100, blocks=32, block_size=4, groups=2)
    a, b = gen("a", 5), gen("b", 5)
    s.add([a])
    first = s.schedule()
    s.add([b])
    second = s.schedule()
    assert ids(first) == ["a"] and ids(second) == ["b"]
    assert s.schedule() is None  # both in flight
    back(s, first)
    third = s.schedule()
    assert ids(third) == ["a"] and third.seq_lens == [1]


def test_one_group_joins_the_next_step() -> None:
    # one stage: what arrives while a step is inside joins the next step, not a step of its own
    s = scheduler(budget=100, blocks=32, block_size=4)
    a, b = gen("a", 5), gen("b", 5, first=100)
    s.add([a])
    first = s.schedule()
    s.add([b])
    assert ids(first) == ["a"] and s.schedule() is None
    back(s, first)
    second = s.schedule()
    assert ids(second) == ["a", "b"] and second.seq_lens == [1, 5]


def test_the_running_set_splits_into_one_step_per_group() -> None:
    s = scheduler(budget=100, blocks=64, block_size=4, groups=2)
    seqs = [gen(f"s{i}", 3) for i in range(6)]
    s.add(seqs)
    prefill = s.schedule()
    assert len(prefill) == 6
    back(s, prefill)
    one, two = s.schedule(), s.schedule()
    assert len(one) == len(two) == 3 and not {*ids(one)} & {*ids(two)}
    assert s.schedule() is None  # a step per group is inside


def test_stop_conditions() -> None:
    s = scheduler(budget=100, blocks=32, block_size=4, eos=7)
    stop = gen("stop", 3, stop_token_ids=[9])
    eos = gen("eos", 3)
    ignore = gen("ignore", 3, max_new=2, ignore_eos=True)
    s.add([stop, eos, ignore])
    batch = s.schedule()
    _, finished = s.postprocess(batch, [1, 7, 7])
    assert finished == [eos] and eos.finish_reason == "stop" and eos.completion_token_ids == [7]
    batch = s.schedule()
    _, finished = s.postprocess(batch, [9, 7])
    assert finished == [stop, ignore]
    assert stop.finish_reason == "stop" and ignore.finish_reason == "length"
    assert s.bm.stats()["blocks_used"] == 0


def test_a_running_sequence_short_of_a_block_preempts_the_latest_admitted() -> None:
    s = scheduler(budget=100, blocks=4, block_size=2)
    a, b = gen("a", 3, max_new=3), gen("b", 3, max_new=3, first=10)
    s.add([a, b])
    batch = s.schedule()
    assert ids(batch) == ["a", "b"]  # 2 blocks each: the cache is full
    back(s, batch)  # 4 tokens each: still 2 blocks each
    back(s, s.schedule())  # 5 tokens each: each needs a third block
    batch = s.schedule()
    assert ids(batch) == ["a"] and s.preemptions == 1
    assert b.status is Status.WAITING and b.num_cached_tokens == 0 and not b.block_table
    assert list(s.waiting) == [b] and b.completion_token_ids == [7, 7]
    assert back(s, batch) == [a]
    batch = s.schedule()  # b comes back: its prompt and both tokens recomputed, then sampled
    assert ids(batch) == ["b"] and batch.seq_lens == [5 - b.num_cached_tokens]
    assert back(s, batch) == [b] and b.completion_token_ids == [7, 7, 7]
    assert s.bm.num_free == 4 and s.bm.stats()["blocks_used"] == 0


def test_cancel_and_restart_give_blocks_back() -> None:
    s = scheduler(budget=100, blocks=8, block_size=2)
    a, b = gen("a", 3, max_new=5), gen("b", 3, max_new=5, first=10)
    s.add([a, b])
    inside = s.schedule()
    assert s.drop({"a"}) == [a] and a.is_finished()
    assert s.bm.stats()["blocks_used"] == 2
    _, finished = s.postprocess(inside, [1, 2])  # a's token is dropped with it
    assert not finished and a.num_completion_tokens == 0 and b.completion_token_ids == [2]
    s.recompute_all(6)  # the workers died; the new ones hold 6 blocks
    assert s.bm.num_blocks == 6 and s.bm.num_free == 6
    assert list(s.waiting) == [b] and b.num_cached_tokens == 0 and not b.inflight
    batch = s.schedule()
    assert batch.seq_lens == [4] and batch.epoch == s.epoch


def test_a_suspect_step_runs_alone() -> None:
    s = scheduler(budget=100, blocks=16, block_size=2)
    a, b = gen("a", 3), gen("b", 3, first=10)
    s.add([a, b])
    batch = s.schedule()
    a.suspect = b.suspect = True  # the batch was refused; both run again alone
    s.landed(batch)
    s.release(batch.seqs)
    first = s.schedule()
    assert ids(first) == ["a"]
    back(s, first)
    assert ids(s.schedule()) == ["b"]


def test_a_sequence_larger_than_the_cache_is_set_aside() -> None:
    s = scheduler(budget=100, blocks=2, block_size=2)
    big = gen("big", 5)
    s.add([big])
    assert s.schedule() is None and s.unfit == [big]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 12), st.integers(1, 6)), min_size=1, max_size=8),
    st.integers(4, 12),
    st.integers(1, 3),
    st.integers(0, 2**16),
)
def test_every_sequence_completes_and_every_block_comes_back(
    jobs: list[tuple[int, int]], blocks: int, inflight: int, seed: int
) -> None:
    """Random prompts through a tiny cache with several micro-batches in flight, answered in
    random order: every sequence gets exactly its tokens (none twice after a preemption), no
    step exceeds the budget, no sequence is in two steps at once, and no block leaks."""
    rng = random.Random(seed)
    s = scheduler(budget=6, blocks=blocks, block_size=2)
    seqs = [gen(f"s{i}", n, max_new=m, first=i * 3) for i, (n, m) in enumerate(jobs)]
    fits = [q for q in seqs if -(-(q.num_tokens + q.params.max_new_tokens) // 2) <= blocks]
    s.add(fits)
    inside: list[MicroBatch] = []
    for _ in range(10_000):
        while len(inside) < inflight and (batch := s.schedule()) is not None:
            assert batch.num_tokens <= 6
            assert not {id(q) for q in batch.seqs} & {id(q) for b in inside for q in b.seqs}
            inside.append(batch)
        if not inside:
            break
        batch = inside.pop(rng.randrange(len(inside)))
        # the k-th token of every sequence is k: a token made twice would show
        s.postprocess(batch, [batch.seqs[i].num_completion_tokens for i in batch.sample])
    assert not s.waiting and not s.running and not s.unfit
    for q in fits:
        assert q.completion_token_ids == list(range(q.params.max_new_tokens))
    assert s.bm.num_free == blocks and s.bm.stats()["blocks_used"] == 0


def test_static_batching_padded_and_shrinking() -> None:
    """Nothing joins a static batch until it has ended; "padded" keeps a member that has ended
    computing (unseen) until the longest ends, "shrinking" lets it drop out."""
    for mode, widths in (("padded", [3, 3, 3, 3]), ("shrinking", [3, 2, 1, 1])):
        s = Scheduler(100, 0, BlockManager(32, 4), static=mode)
        s.add([gen("a", 3, max_new=2), gen("b", 3, max_new=3), gen("c", 3, max_new=5)])
        s.add([gen("late", 3, max_new=1)])
        s.budget = 9  # the first step takes a, b and c only
        done: list[str] = []
        seen = []
        while len(done) < 3:
            batch = s.schedule()
            assert batch is not None and "late" not in ids(batch)
            seen.append(len(batch.seqs))
            stepped, finished = s.postprocess(batch, [7] * len(batch.sample))
            assert all(not q.filler for q in (*stepped, *finished))  # fillers are never answered
            done += [q.id for q in finished]
        assert done == ["a", "b", "c"] and seen[1:] == widths, mode
        assert s.running == [] and s.bm.num_free == 32  # padding gone with the batch, blocks back
        assert ids(s.schedule()) == ["late"]
    s = Scheduler(100, 0, BlockManager(32, 4), static="padded")
    s.add([gen("a", 3, max_new=1), gen("b", 3, max_new=4)])
    back(s, s.schedule())
    assert s.drop({"a"}) == [] and len(s.running) == 2  # a is answered; its filler is no job
    s.recompute_all()
    assert [q.id for q in s.waiting] == ["b"]  # a filler is never computed again
