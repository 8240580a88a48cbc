"""KV-cache blocks: which sequence holds which block, and which full blocks can be shared.

The workers hold the K/V; this only books the slots. A full block is named by a hash that chains
over every token up to its end (the previous block's hash and this block's tokens), so one hash
names one whole prefix; a hit is also checked token by token, and the hash is a cryptographic
one, so no crafted prompt can read another's K/V. A block is registered under its hash only once
its tokens have come back from the last stage (`commit`): a later micro-batch then reads K/V
that every stage has written (each stage takes micro-batches in order), never a block whose
prefill is still in flight or was refused on the way.

Freed blocks that carry a hash stay cached, and are evicted least recently freed first, only when
a fresh block is needed and no never-used (or hashless) block is left.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from controller.sequence import Sequence


@dataclass(slots=True)
class Block:
    id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: list[int] = field(default_factory=list)  # kept to verify a hit


def chain_hash(prev: bytes | None, token_ids: list[int]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    if prev is not None:
        h.update(prev)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_sharing: bool = True) -> None:
        assert num_blocks > 0 and block_size > 0
        Sequence.block_size = block_size  # one block size per controller
        self.block_size, self.prefix_sharing = block_size, prefix_sharing
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[bytes, int] = {}
        self.free: deque[int] = deque(range(num_blocks))  # free, no hash: taken first
        self.cached: OrderedDict[int, None] = OrderedDict()  # free with a hash, oldest first
        self.prefix_hits_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks a fresh allocation can take (cached ones are evicted for it)."""
        return len(self.free) + len(self.cached)

    def _take(self) -> Block:
        if self.free:
            block = self.blocks[self.free.popleft()]
        else:
            bid, _ = self.cached.popitem(last=False)  # least recently freed
            block = self.blocks[bid]
            if self.hash_to_block.get(block.hash) == bid:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, []
        block.ref_count = 1
        return block

    def _release(self, block: Block) -> None:
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block.id} freed twice"
        if block.ref_count == 0:
            if block.hash is not None:
                self.cached[block.id] = None  # most recently freed: evicted last
            else:
                self.free.append(block.id)

    def _hits(self, seq: Sequence) -> list[Block]:
        """The cached blocks seq's leading full blocks can share. The block holding its last
        token never counts: at least one token must be computed so the step yields logits."""
        out: list[Block] = []
        if not self.prefix_sharing:
            return out
        h: bytes | None = None
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = seq.block(i)
            h = chain_hash(h, tokens)
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != tokens:
                break
            out.append(self.blocks[bid])
        return out

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._hits(seq)
        # a hit on a cached (free) block takes it out of the free pool like a fresh one
        shared = sum(1 for b in hits if b.ref_count > 0)
        return seq.num_blocks - shared <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Blocks for all of seq's tokens: its cached prefix shared, the rest fresh."""
        assert not seq.block_table, f"{seq.id} already holds blocks"
        hits = self._hits(seq)
        for block in hits:
            if block.ref_count == 0:
                del self.cached[block.id]
            block.ref_count += 1
            seq.block_table.append(block.id)
        for _ in range(seq.num_blocks - len(hits)):
            seq.block_table.append(self._take().id)
        seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)
        self.prefix_hits_tokens += seq.num_cached_tokens

    def deallocate(self, seq: Sequence) -> None:
        # tail first: the tail of a prefix is freed earlier than its head, so evicted earlier
        for bid in reversed(seq.block_table):
            self._release(self.blocks[bid])
        seq.block_table.clear()
        seq.num_cached_tokens = 0
        seq.num_hashed_blocks = 0

    def can_append(self, seq: Sequence) -> bool:
        return seq.num_blocks - len(seq.block_table) <= self.num_free

    def may_append(self, seq: Sequence) -> None:
        """Room for every token of seq (a fresh block when it has crossed a block boundary),
        and hashes for the blocks its computed tokens have filled."""
        while len(seq.block_table) < seq.num_blocks:
            seq.block_table.append(self._take().id)
        self.commit(seq)

    def commit(self, seq: Sequence) -> None:
        """Register the full blocks among seq's computed tokens (K/V written by every stage)."""
        if not self.prefix_sharing:
            return
        full = min(seq.num_cached_tokens // self.block_size, len(seq.block_table))
        for i in range(seq.num_hashed_blocks, full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                # blocks before i are hashed (shared hits or committed earlier): the chain holds
                prev = self.blocks[seq.block_table[i - 1]].hash if i else None
                block.token_ids = seq.block(i)
                block.hash = chain_hash(prev, block.token_ids)
                # a twin computed at the same time keeps the name; this block stays private
                self.hash_to_block.setdefault(block.hash, block.id)
            seq.num_hashed_blocks = i + 1

    def reset(self, num_blocks: int | None = None) -> None:
        """Every block free and nothing cached: the workers' KV is gone (a replica restart)."""
        self.__init__(num_blocks or self.num_blocks, self.block_size, self.prefix_sharing)

    def stats(self) -> dict[str, int]:
        used = self.num_blocks - self.num_free
        return {
            "blocks_total": self.num_blocks,
            "blocks_used": used,
            "blocks_free": self.num_free,
            "blocks_cached": len(self.cached),
            "block_size": self.block_size,
            "prefix_hits_tokens": self.prefix_hits_tokens,
        }
