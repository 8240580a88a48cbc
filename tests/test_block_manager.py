"""The KV block manager: allocation, prefix sharing, reference counts, LRU eviction, no leaks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.block_manager import BlockManager
from controller.sequence import SamplingParams, Sequence


def seq(sid: str, tokens: list[int]) -> Sequence:
    return Sequence(sid, "generate", list(tokens), params=SamplingParams(), oneshot=False)


def computed(bm: BlockManager, s: Sequence) -> None:
    """As the controller does when a step comes back: every token is in the cache."""
    s.num_cached_tokens = s.num_tokens
    bm.commit(s)


def test_allocate_and_deallocate_give_every_block_back() -> None:
    bm = BlockManager(8, 4)
    a = seq("a", range(10))  # 3 blocks, the last holding 2 tokens
    assert a.num_blocks == 3 and a.last_block_num_tokens == 2 and a.block(2) == [8, 9]
    assert bm.can_allocate(a)
    bm.allocate(a)
    assert len(a.block_table) == 3 and a.num_cached_tokens == 0
    assert bm.stats()["blocks_used"] == 3 and bm.stats()["blocks_free"] == 5
    bm.deallocate(a)
    assert a.block_table == [] and bm.stats()["blocks_used"] == 0 and bm.num_free == 8


def test_a_shared_prefix_is_computed_once() -> None:
    bm = BlockManager(16, 4)
    a = seq("a", [*range(12), 50])
    bm.allocate(a)
    b = seq("b", [*range(12), 60, 61])
    bm.allocate(b)
    assert b.num_cached_tokens == 0  # a's blocks are not named until its step came back
    bm.deallocate(b)
    computed(bm, a)
    b = seq("b", [*range(12), 60, 61])
    bm.allocate(b)
    assert b.num_cached_tokens == 12 and b.block_table[:3] == a.block_table[:3]
    assert b.block_table[3] != a.block_table[3]
    assert [bm.blocks[i].ref_count for i in a.block_table[:3]] == [2, 2, 2]
    assert bm.stats()["prefix_hits_tokens"] == 12
    # a differing first block breaks the chain: nothing later is shared, even equal blocks
    c = seq("c", [99, 1, 2, 3, *range(4, 12), 7])
    bm.allocate(c)
    assert c.num_cached_tokens == 0
    bm.deallocate(a)
    assert [bm.blocks[i].ref_count for i in b.block_table[:3]] == [1, 1, 1]
    for s in (b, c):
        bm.deallocate(s)
    assert bm.stats()["blocks_used"] == 0


def test_the_block_holding_the_last_token_is_computed_again() -> None:
    bm = BlockManager(8, 4)
    a = seq("a", range(8))
    bm.allocate(a)
    computed(bm, a)
    bm.deallocate(a)
    again = seq("again", range(8))  # both blocks are cached, but the last token needs logits
    bm.allocate(again)
    assert again.num_cached_tokens == 4
    bm.deallocate(again)


def test_a_hit_is_checked_token_by_token() -> None:
    bm = BlockManager(8, 4)
    a = seq("a", range(9))
    bm.allocate(a)
    computed(bm, a)
    block = bm.blocks[a.block_table[0]]
    block.token_ids = [7, 7, 7, 7]  # as if another prefix had the same hash
    b = seq("b", range(9))
    bm.allocate(b)
    assert b.num_cached_tokens == 0


def test_cached_blocks_are_evicted_least_recently_freed_first() -> None:
    bm = BlockManager(5, 2)
    old = seq("old", [1, 2, 3])
    new = seq("new", [5, 6, 7])
    for s in (old, new):
        bm.allocate(s)
        computed(bm, s)
    bm.deallocate(old)
    bm.deallocate(new)
    assert bm.stats()["blocks_cached"] == 2  # each one's full first block
    # four fresh blocks: the three hashless ones go first, then the oldest cached one
    filler = seq("filler", [9] * 7)
    bm.allocate(filler)
    assert bm.stats()["blocks_cached"] == 1
    bm.deallocate(filler)
    again = seq("again", [5, 6, 8])
    bm.allocate(again)
    assert again.num_cached_tokens == 2  # "new" survived
    lost = seq("lost", [1, 2, 8])
    bm.allocate(lost)
    assert lost.num_cached_tokens == 0  # "old" was evicted


def test_appending_takes_a_block_at_each_boundary_and_names_full_ones() -> None:
    bm = BlockManager(4, 2)
    a = seq("a", [1, 2])
    bm.allocate(a)
    computed(bm, a)
    a.append(3)
    assert bm.can_append(a)
    bm.may_append(a)
    assert len(a.block_table) == 2
    computed(bm, a)
    a.append(4)
    bm.may_append(a)  # [3, 4] fits the second block
    assert len(a.block_table) == 2
    computed(bm, a)
    assert a.num_hashed_blocks == 2
    b = seq("b", [1, 2, 3, 4, 5])
    bm.allocate(b)
    assert b.num_cached_tokens == 4
    bm.deallocate(a)
    bm.deallocate(b)
    assert bm.num_free == 4


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["new", "step", "free", "preempt"]),
            st.integers(0, 7),
            st.lists(st.integers(0, 3), min_size=1, max_size=12),
        ),
        max_size=80,
    )
)
def test_no_block_leaks_whatever_the_order(ops: list) -> None:
    bm = BlockManager(12, 3)
    live: list[Sequence] = []
    n = 0
    for op, pick, tokens in ops:
        if op == "new" or not live:
            s = seq(f"s{n}", tokens)  # few distinct tokens: prefixes are shared often
            n += 1
            if bm.can_allocate(s):
                bm.allocate(s)
                live.append(s)
            continue
        s = live[pick % len(live)]
        if op == "step":
            computed(bm, s)
            s.append(tokens[0])
            if bm.can_append(s):
                bm.may_append(s)
            else:  # preempted: back to waiting, recomputed later
                bm.deallocate(s)
                live.remove(s)
        else:
            bm.deallocate(s)
            live.remove(s)
        check(bm, live)
    for s in live:
        bm.deallocate(s)
    check(bm, [])
    assert bm.num_free == 12 and bm.stats()["blocks_used"] == 0


def check(bm: BlockManager, live: list[Sequence]) -> None:
    refs = [0] * bm.num_blocks
    for s in live:
        assert len(s.block_table) == s.num_blocks
        for b in s.block_table:
            refs[b] += 1
    assert refs == [b.ref_count for b in bm.blocks]
    free = set(bm.free) | set(bm.cached)
    assert len(free) == len(bm.free) + len(bm.cached)  # no block in both, none twice
    assert free == {i for i, r in enumerate(refs) if r == 0}
    for h, bid in bm.hash_to_block.items():
        assert bm.blocks[bid].hash == h
