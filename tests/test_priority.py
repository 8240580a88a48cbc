"""Priorities (a job's `priority`: 0 first, higher later): the broker serves the most urgent
first but keeps later ones moving; the priority survives a restart in the journal; the
controller's queue keeps priority order, and a waiting interactive sequence takes the blocks of
running batch ones (which are recomputed later) and never the other way round; a sequence that
waits too long is served as interactive."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_scheduler import back, gen, ids, item, scheduler

from broker.jobs import STARVE, Job, Table
from broker.journal import Journal
from broker.validation import Served, validate
from controller import scheduler as sched
from controller.block_manager import BlockManager
from controller.sequence import Status
from wire.limits import MAX_PRIORITY, Limits
from wire.protocol import ProtocolError


def job(jid: str, priority: int) -> Job:
    return Job(jid, "embed", f"text {jid}", "m", priority=priority)


async def test_the_broker_serves_priority_order_and_keeps_later_work_moving(tmp_path: Path):
    journal = Journal(str(tmp_path / "j.sqlite3"))
    table = Table(journal, max_attempts=3)
    table.add([job(f"b{i}", 1) for i in range(20)])
    table.add([job(f"i{i}", 0) for i in range(20)])
    taken = [j.id for j in table.take("m", 2 * STARVE, b"c")]
    # interactive first, but every STARVE-th job from the batch level
    assert taken.count("b0") == 1 and taken.index("b0") == STARVE - 1
    assert sum(t.startswith("b") for t in taken) == 2
    assert [t for t in taken if t.startswith("i")] == [f"i{i}" for i in range(2 * STARVE - 2)]
    rest = [j.id for j in table.take("m", 100, b"c")]
    assert len(rest) == 40 - 2 * STARVE and rest[-1].startswith("b")
    await journal.close()


async def test_a_priority_survives_a_restart(tmp_path: Path):
    path = str(tmp_path / "j.sqlite3")
    journal = Journal(path)
    Table(journal, max_attempts=3).add([job("late", 3), job("soon", 0)])
    await journal.close()
    again = Journal(path)
    table = Table(again, max_attempts=3)
    assert table.recover() == 2
    first, second = table.take("m", 2, b"c")
    assert (first.id, first.priority, second.id, second.priority) == ("soon", 0, "late", 3)
    assert second.wire()["priority"] == 3 and "priority" not in first.wire()
    await again.close()


@pytest.mark.parametrize("bad", [-1, MAX_PRIORITY + 1, 1.0, True, "1"])
def test_a_bad_priority_is_refused_naming_the_field(bad):
    served = {"m": Served(frozenset({"embed"}))}
    with pytest.raises(ProtocolError, match="priority"):
        validate({"task": "embed", "text": "x", "priority": bad}, served, "m", Limits())
    ok = validate({"task": "embed", "text": "x", "priority": 2}, served, "m", Limits())
    assert ok.priority == 2


def test_the_controller_queue_keeps_priority_order():
    s = scheduler(budget=100, blocks=8, block_size=4)
    s.add([item("b1", 2, priority=1), item("i1", 2), item("b2", 2, priority=1), item("i2", 2)])
    assert [q.id for q in s.waiting] == ["i1", "i2", "b1", "b2"]
    s.requeue([item("r", 2, priority=1)])  # back in front of its own priority, not before 0's
    assert [q.id for q in s.waiting] == ["i1", "i2", "r", "b1", "b2"]
    assert ids(s.take()) == ["i1", "i2", "r", "b1", "b2"]


def test_an_interactive_sequence_takes_a_batch_sequences_blocks():
    s = scheduler(budget=100, blocks=4, block_size=2)
    b1, b2 = gen("b1", 3, max_new=8), gen("b2", 3, max_new=8, first=10)
    b1.priority = b2.priority = 1
    s.add([b1, b2])
    batch = s.schedule()
    assert ids(batch) == ["b1", "b2"]  # two blocks each: the cache is full
    back(s, batch)
    urgent = gen("i", 3, max_new=2, first=20)
    s.add([urgent])
    batch = s.schedule()
    # b2 (the later admitted of the batch ones) gave its blocks; b1 decodes after the newcomer
    assert ids(batch) == ["i", "b1"] and s.preemptions == 1
    assert b2.status is Status.WAITING and list(s.waiting) == [b2]
    back(s, batch)
    # an interactive sequence is never preempted for a batch one at the head of the queue
    batch = s.schedule()
    assert "i" in ids(batch) and urgent.status is Status.RUNNING


def test_a_long_wait_is_served_as_interactive():
    s = scheduler(budget=100, blocks=8, block_size=4)
    s.add([item("old", 2, priority=1)])
    s.waiting[0].arrived -= sched.AGE_S + 1  # it has waited too long behind urgent work
    s.add([item("new", 2)])
    assert [q.id for q in s.waiting] == ["new", "old"]
    batch = s.schedule()
    assert ids(batch) == ["old", "new"] and all(q.priority == 0 for q in batch.seqs)


async def test_an_interactive_job_overtakes_a_queued_batch_through_the_fleet():
    """600 batch jobs (priority 1) queued, then one interactive job: it is answered while most
    of the batch still waits, and the whole batch is answered after it."""
    import asyncio

    from conftest import start
    from corpus import texts

    from baton.client import Client

    fleet = start("batching.max_batch_tokens=512")
    try:
        async with Client(fleet.endpoint, timeout_s=120) as c:
            batch = texts(600, seed=11)
            queued = await c.submit(
                {"task": "embed", "text": t or "x", "priority": 1} for t in batch
            )
            [urgent] = await c.submit([{"task": "embed", "text": "now, please"}])
            result = await asyncio.wait_for(urgent, 120)
            ahead = sum(f.done() for f in queued)
            assert result.ok and ahead < len(queued) // 2, ahead
            rest = await asyncio.wait_for(asyncio.gather(*queued), 240)
            assert all(r.ok for r in rest)
    finally:
        fleet.stop()


def test_an_interactive_prompt_joins_before_batch_prefills_under_way():
    s = scheduler(budget=8, blocks=32, block_size=4)
    long = gen("b", 20, max_new=2)
    long.priority = 1
    s.add([long])
    back(s, s.schedule())  # 8 of its 20 prompt tokens: its prefill is under way
    s.add([gen("i", 5, max_new=2, first=50)])
    batch = s.schedule()
    # the newcomer's whole prompt first, then what the budget leaves of the batch prefill
    assert ids(batch) == ["i", "b"] and batch.seq_lens == [5, 3] and batch.sample == [0]


def test_batch_work_keeps_to_yield_tokens_while_interactive_work_is_about():
    s = sched.Scheduler(100, 0, BlockManager(64, 4), yield_tokens=2)
    batch_seqs = [gen(f"b{k}", 3, max_new=50, first=10 * k) for k in range(4)]
    for q in batch_seqs:
        q.priority = 1
    s.add(batch_seqs)
    step = s.schedule()
    assert ids(step) == ["b0", "b1", "b2", "b3"]  # no interactive work: no cap
    back(s, step)
    s.add([gen("i", 3, max_new=50, first=90)])
    step = s.schedule()
    assert ids(step) == ["i"]  # its prompt's step: its first token waits for all of the step
    back(s, step)
    step = s.schedule()
    assert ids(step) == ["i", "b0", "b1"] and step.seq_lens == [1, 1, 1]
    back(s, step)
    step = s.schedule()  # the batch ones that waited go next: none starves
    assert ids(step) == ["i", "b2", "b3"]
    back(s, step)
    s.drop({"i"})  # interactive work gone, but recently: the cap holds a while
    step = s.schedule()
    assert ids(step) == ["b0", "b1"]
    back(s, step)
    s.interactive_at -= sched.YIELD_S
    assert ids(s.schedule()) == ["b2", "b3", "b0", "b1"]


def test_a_one_shot_batch_of_later_priority_keeps_to_yield_tokens():
    s = sched.Scheduler(100, 0, yield_tokens=4)
    s.add([item(f"b{k}", 2, priority=1) for k in range(6)])
    assert ids(s.take()) == [f"b{k}" for k in range(6)]  # nothing interactive seen: whole budget
    s.add([item("i", 2)] + [item(f"c{k}", 2, priority=1) for k in range(6)])
    assert ids(s.take()) == ["i"]  # interactive first, and alone: it waits for all its batch
    assert ids(s.take()) == ["c0", "c1"]  # then 4 tokens of later work a batch
    assert ids(s.take()) == ["c2", "c3"]
