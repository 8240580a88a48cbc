"""One scheduler for every task: a deque of waiting sequences, a list of running ones.

One-shot tasks (embed, echo) run once, whole: a batch holds one task (a run of same-task jobs at
the head of the queue) within the token budget; it leaves when full, when its oldest job has
waited `max_wait_ms`, or at once when the pipeline is idle (waiting then only adds latency).

Generate sequences are scheduled per iteration: every call forms a micro-batch of the running
sequences not already in flight (decodes first, one token each, then the prefills under way) and
admits waiting ones while the token budget lasts and their KV blocks fit. A long prompt is cut
into chunks so the micro-batch stays within `max_batch_tokens`; only the chunk that reaches the
end of a sequence samples a token. With P stages up to `pipeline.max_inflight` disjoint
micro-batches are inside at once; a sequence is in at most one of them. When a running sequence
cannot get its next block, the most recently admitted sequence not in flight is preempted: its
blocks are freed and it goes back to the front of the queue, to be recomputed (prompt and the
tokens made so far) when it is admitted again.

Priorities: the queue is kept in priority order (0 first; arrival order within one), and a step
takes the more urgent sequences first: a waiting priority-0 prompt joins before the running batch
work's tokens. A waiting generate sequence that does not fit preempts running ones of a later
priority, latest first, so interactive work gets in while batch work fills the fleet. A step
cannot be cut short once it is inside, so what interactive work waits for is the step ahead of
it: while priority-0 work runs or waits, and for YIELD_S after, work of later priorities takes
at most `yield_tokens` tokens a step (least recently stepped first), keeping those steps short,
and none of a step that prefills an interactive prompt. A sequence that has waited AGE_S counts
as priority 0 from then on: later work is slowed, never starved.

A job whose earlier run was lost with a dying worker, or in a refused batch, is a suspect and
runs alone, so a job that kills workers cannot take its neighbours' attempts with it. Jobs past
their deadline are set aside (`late`); the controller fails them.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from controller.block_manager import BlockManager
from controller.sequence import SamplingParams, Sequence, Status

AGE_S = 30.0  # a sequence waiting this long is served as priority 0
# Later-priority work keeps to `yield_tokens` a step this long after the last interactive work:
# interactive requests arrive one after another, and the first of each would otherwise wait
# behind a full-size step formed in the gap.
YIELD_S = 10.0


@dataclass(slots=True)
class MicroBatch:
    """One step's work: the sequences, how many tokens each computes, which ones sample."""

    task: str
    seqs: list[Sequence]
    seq_lens: list[int] = field(default_factory=list)  # generate: tokens computed this step
    sample: list[int] = field(default_factory=list)  # indices into seqs that sample a token
    epoch: int = 0  # the scheduler's KV epoch it was formed in (generate)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def oneshot(self) -> bool:
        return not self.seqs or self.seqs[0].oneshot

    @property
    def suspect(self) -> bool:
        return any(s.suspect for s in self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens) if self.seq_lens else sum(s.num_tokens for s in self.seqs)

    def pruned(self) -> MicroBatch:
        """Without the sequences that finished (were cancelled) since it was formed."""
        if self.oneshot or not any(s.is_finished() for s in self.seqs):
            return self
        keep = [i for i, s in enumerate(self.seqs) if not s.is_finished()]
        rows = {old: new for new, old in enumerate(keep)}
        return MicroBatch(
            self.task,
            [self.seqs[i] for i in keep],
            [self.seq_lens[i] for i in keep],
            [rows[i] for i in self.sample if i in rows],
            self.epoch,
        )


def _order(seq: Sequence) -> tuple[int, bool, int]:
    prefill = seq.num_tokens - seq.num_cached_tokens > 1
    return seq.priority, prefill, 0 if prefill else seq.turn


@dataclass(slots=True)
class _Step:
    """A generate micro-batch being formed: the token budget, and the part of it that work of
    later priorities than 0 may take (`later`, None = all of it)."""

    batch: MicroBatch
    budget: int
    later: int | None
    used: int = 0
    chosen: set[int] = field(default_factory=set)

    def left(self, priority: int) -> int:
        room = self.budget - self.used
        return room if priority == 0 or self.later is None else min(room, self.later)

    def put(self, seq: Sequence, q: int) -> None:
        b = self.batch
        if seq.num_cached_tokens + q == seq.num_tokens:
            b.sample.append(len(b.seqs))
        b.seqs.append(seq)
        b.seq_lens.append(q)
        self.chosen.add(id(seq))
        self.used += q
        if self.later is not None:
            if seq.interactive and q > 1:
                self.later = 0  # an interactive prompt's step: its first token waits on all of it
            elif seq.priority:
                self.later -= q


class Scheduler:
    def __init__(
        self,
        max_batch_tokens: int,
        max_wait_ms: float,
        block_manager: BlockManager | None = None,
        eos_token_id: int | Iterable[int] | None = None,
        groups: int = 1,
        static: str = "off",
        yield_tokens: int = 0,
    ) -> None:
        self.budget = max_batch_tokens
        # tokens a step for work of later priorities while interactive work is about; 0 = no cap
        self.yield_tokens = yield_tokens
        self.interactive_at = -YIELD_S  # monotonic time interactive work was last seen
        # With P pipeline stages, the running sequences split into P micro-batches in flight at
        # once, so every stage works on one while the others work on the rest.
        self.groups = groups
        # "off"; or static batching (admit only into an empty running set), "padded" or
        # "shrinking" (controller/config.py)
        self.static = static
        self.max_wait = max_wait_ms / 1000
        self.bm = block_manager  # None: the model does not generate
        # end-of-sequence tokens: one, or several (Llama 3 lists them)
        self.eos = frozenset(
            ()
            if eos_token_id is None
            else (eos_token_id,)
            if isinstance(eos_token_id, int)
            else eos_token_id
        )
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # generate sequences holding blocks, admission order
        self.tokens = 0  # cost of the waiting sequences
        self.arrived = asyncio.Event()  # something may have become schedulable
        self.late: list[Sequence] = []  # past their deadline; the controller fails them
        self.unfit: list[Sequence] = []  # more tokens than the whole KV cache; failed likewise
        self.epoch = 0  # bumped whenever every block is taken back (the KV is gone)
        # generate micro-batches in flight (this epoch): at most one per group, so a sequence
        # that comes back while its group's step is inside waits to join the next step instead
        # of setting off a micro-batch of its own (which would split the running set into ever
        # smaller steps, each paying a whole forward's fixed cost)
        self.steps = 0
        self.formed = 0  # generate steps formed, ever: the clock of Sequence.turn
        self.preemptions = 0

    def __len__(self) -> int:
        return len(self.waiting)

    # -- the queue -----------------------------------------------------------------------------

    def add(self, seqs: Iterable[Sequence]) -> None:
        seqs = list(seqs)
        for s in seqs:
            self._insert(s, first=False)
        if any(s.interactive for s in seqs):
            self.interactive_at = time.monotonic()
        self.tokens += sum(s.cost for s in seqs)
        self.arrived.set()

    def requeue(self, seqs: list[Sequence]) -> None:
        """Sequences that must run again go first among their priority: they have waited
        longest."""
        for s in reversed(seqs):
            s.status = Status.WAITING
            s.inflight = False
            self._insert(s, first=True)
        self.tokens += sum(s.cost for s in seqs)
        self.arrived.set()

    def _insert(self, seq: Sequence, first: bool) -> None:
        """Into the queue by priority: after the last of its own (or, `first`, before the first
        of its own). Most jobs share one priority, so the common case is an append."""
        w = self.waiting
        if first:
            at = next((i for i, s in enumerate(w) if s.priority >= seq.priority), len(w))
        elif not w or w[-1].priority <= seq.priority:
            at = len(w)
        else:
            at = next(i for i, s in enumerate(w) if s.priority > seq.priority)
        if at == len(w):
            w.append(seq)
        elif at == 0:
            w.appendleft(seq)
        else:
            w.insert(at, seq)

    def _age(self) -> None:
        """Sequences that have waited AGE_S behind more urgent ones count as priority 0 now."""
        if not self.waiting or self.waiting[-1].priority == 0:
            return
        old = time.monotonic() - AGE_S
        aged = [s for s in self.waiting if s.priority and s.arrived < old]
        if aged:
            w = self.waiting = deque(
                s for s in self.waiting if not (s.priority and s.arrived < old)
            )
            for s in aged:  # among priority 0 by arrival: they came before the later ones
                s.priority, s.aged = 0, True
                at = next(
                    (i for i, q in enumerate(w) if q.priority or q.arrived > s.arrived), len(w)
                )
                w.insert(at, s)

    def drop(self, ids: set[str]) -> list[Sequence]:
        """Cancelled: out of the queue, and running ones end now, their blocks freed at once
        (a step still in flight wrote them before any later micro-batch reaches them: every
        stage takes micro-batches in order). One-shot batches in flight are not held here."""
        gone = [s for s in self.waiting if s.id in ids]
        if gone:
            self.waiting = deque(s for s in self.waiting if s.id not in ids)
            self.tokens -= sum(s.cost for s in gone)
            for s in gone:
                s.status = Status.FINISHED
        for s in [s for s in self.running if s.id in ids and not s.filler]:
            self.finish(s, "cancelled")
            gone.append(s)
        if gone:
            self.arrived.set()  # freed blocks may let a waiting sequence in
        return gone

    def clear(self) -> list[Sequence]:
        """Every sequence held here, taken out (the broker has put these jobs back in its queue):
        waiting ones, and running ones, whose generation would go to a job now elsewhere."""
        gone = list(self.waiting)
        self.waiting.clear()
        self.tokens = 0
        for s in gone:
            s.status = Status.FINISHED
        for s in list(self.running):
            self.finish(s, "cancelled")
            if not s.filler:
                gone.append(s)
        return gone

    def finish(self, seq: Sequence, reason: str | None = None) -> None:
        """A running sequence ends (done, cancelled, late or failed): its blocks go back."""
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or reason
        if self.bm is not None and seq.block_table:
            self.bm.deallocate(seq)
        if seq in self.running:
            self.running.remove(seq)
        self.arrived.set()  # its blocks may let a waiting sequence in

    def release(self, seqs: Iterable[Sequence]) -> None:
        """Running sequences whose step was refused: schedulable again, blocks kept (the K/V
        before the step is intact; the step's own slots are simply written again)."""
        for s in seqs:
            s.inflight = False
        self.arrived.set()

    def recompute_all(self, num_blocks: int | None = None) -> None:
        """The workers' KV is gone (a replica restart): every running sequence goes back to the
        front of the queue, in admission order, to be recomputed; every block is free again."""
        seqs, self.running = [s for s in self.running if not s.filler], []
        for s in seqs:
            s.block_table.clear()
            s.num_cached_tokens = s.num_hashed_blocks = 0
        if self.bm is not None:
            self.bm.reset(num_blocks)
        self.epoch += 1
        self.steps = 0
        self.requeue(seqs)

    # -- forming batches -----------------------------------------------------------------------

    async def next(self, idle: Callable[[], bool]) -> MicroBatch:
        """The next micro-batch; waits for work, and (a one-shot batch, unless the pipeline is
        idle or generation is waiting for its turn) for a full batch."""
        while True:
            self.arrived.clear()
            if self.waiting and self.waiting[0].oneshot and not self._ready():
                await self._fill(idle)
            batch = self.schedule()
            if batch is not None:
                return batch
            await self.arrived.wait()

    async def _fill(self, idle: Callable[[], bool]) -> None:
        while self.waiting and self.tokens < self.budget and not idle():
            left = self.waiting[0].arrived + self.max_wait - time.monotonic()
            if left <= 0:
                break
            self.arrived.clear()
            try:
                async with asyncio.timeout(left):
                    await self.arrived.wait()
            except TimeoutError:
                break

    def _ready(self) -> bool:
        return any(not s.inflight for s in self.running)

    def schedule(self) -> MicroBatch | None:
        """A micro-batch now, or None when nothing can run (all in flight, no room)."""
        self._age()
        while self.waiting and self.waiting[0].oneshot:
            batch = self.take()
            if batch.seqs:
                return batch  # else it took only late jobs: go on with the next ones
        return self._step()

    def take(self) -> MicroBatch:
        """A one-shot batch from the head: one task, within the budget (later priorities within
        `yield_tokens` while interactive work is about, and not beside interactive jobs), a
        suspect alone."""
        out: list[Sequence] = []
        used = 0
        now = time.time()
        task = self.waiting[0].task if self.waiting else ""
        later = self._later_cap()
        while self.waiting and self.waiting[0].task == task:
            seq = self.waiting[0]
            over = used + seq.cost > self.budget
            if seq.priority and later is not None:
                over = over or later < seq.cost
            if out and (seq.suspect or out[0].suspect or over):
                break
            self.waiting.popleft()
            self.tokens -= seq.cost
            if seq.deadline is not None and seq.deadline <= now:
                seq.status = Status.FINISHED
                self.late.append(seq)
            else:
                seq.start()
                out.append(seq)
                used += seq.cost
                if later is not None:
                    # an interactive job's batch: its answer waits for all of the batch
                    later = 0 if seq.interactive else later - seq.cost * (seq.priority > 0)
        return MicroBatch(task, out)

    def _step(self) -> MicroBatch | None:
        """A generate micro-batch: running sequences not in flight, then admissions."""
        if self.bm is None or self.steps >= self.groups:
            return None
        now = time.time()
        ready = []
        for s in self.running:
            if s.inflight:
                continue
            if s.deadline is not None and s.deadline <= now:
                self.late.append(s)  # finished below, not while iterating
            else:
                ready.append(s)
        for s in self.late:
            if s.status is Status.RUNNING:
                self.finish(s, "deadline")
        self._make_room()
        ready = [s for s in ready if s.status is Status.RUNNING]  # not preempted for the head
        suspects = [s for s in ready if s.suspect]
        alone = bool(suspects)
        if alone:
            ready = suspects[:1]
        elif self._suspect_first():
            ready = []  # a suspect at the head goes now, alone: running ones would starve it
        # the most urgent first; within a priority decodes (their latency is what users see),
        # the least recently stepped first, then the prefills under way in admission order
        ready.sort(key=_order)
        share = -(-len(self.running) // self.groups)  # this group's part of the running set
        del ready[share:]
        batch = MicroBatch("generate", [], epoch=self.epoch)
        step = _Step(batch, self.budget, self._later_cap())
        admit = not alone and not (self.static != "off" and self.running)
        for seq in ready:
            if admit and not self._admit(step, now, below=seq.priority):
                admit = False
            if seq.status is not Status.RUNNING:
                continue  # preempted for another earlier in this pass
            q = min(seq.num_tokens - seq.num_cached_tokens, step.left(seq.priority))
            if q <= 0:
                break  # the rest are of this priority or later: no room for them either
            if not self._room(seq, step.chosen):
                continue  # it was preempted itself
            self.bm.may_append(seq)
            step.put(seq, q)
        if admit:
            self._admit(step, now, below=None)
        if not batch.seqs:
            return None
        self.formed += 1
        for s in batch.seqs:
            s.inflight = True
            s.turn = self.formed
        self.steps += 1
        return batch

    def _later_cap(self) -> int | None:
        """Tokens this step may give work of a later priority than 0: `yield_tokens` while
        interactive work is about (or was, YIELD_S ago), else no cap (None)."""
        if not self.yield_tokens:
            return None
        now = time.monotonic()
        head = self.waiting[0] if self.waiting else None
        if (head is not None and head.interactive) or any(s.interactive for s in self.running):
            self.interactive_at = now
        return self.yield_tokens if now - self.interactive_at < YIELD_S else None

    def _admit(self, step: _Step, now: float, below: int | None) -> bool:
        """Waiting generate sequences into the step while it has room (only those more urgent
        than `below`, when given). False once no more may join it (a suspect joined, or the head
        does not fit), True when it stopped at `below`."""
        while self.waiting and not self.waiting[0].oneshot:
            seq = self.waiting[0]
            if below is not None and seq.priority >= below:
                return True
            if seq.deadline is not None and seq.deadline <= now:
                self.waiting.popleft()
                self.tokens -= seq.cost
                seq.status = Status.FINISHED
                self.late.append(seq)
                continue
            q = min(seq.num_tokens - seq.num_cached_tokens, step.left(seq.priority))
            if q <= 0 or (seq.suspect and step.batch.seqs):
                return False
            if not self.bm.can_allocate(seq):
                if not self.running:  # nothing holds a block: it can never fit
                    self.waiting.popleft()
                    self.tokens -= seq.cost
                    seq.status = Status.FINISHED
                    self.unfit.append(seq)
                    continue
                return False
            self.waiting.popleft()
            self.tokens -= seq.cost
            self.bm.allocate(seq)
            seq.start()
            self.running.append(seq)
            # its prefix may have come from the cache: what is left to compute
            step.put(seq, min(seq.num_tokens - seq.num_cached_tokens, step.left(seq.priority)))
            if seq.suspect:
                return False
        return True

    def _suspect_first(self) -> bool:
        head = self.waiting[0] if self.waiting else None
        # only when it fits: else the running ones must go on, to free blocks for it
        return head is not None and head.suspect and not head.oneshot and self.bm.can_allocate(head)

    def _make_room(self) -> None:
        """The head of the queue, a generate sequence more urgent than running ones, gets their
        blocks if it needs them: the latest priority's, most recently admitted first, of those
        not in flight (a step in flight still writes its blocks)."""
        head = self.waiting[0] if self.waiting else None
        if head is None or head.oneshot or head.suspect or self.static != "off":
            return
        while not self.bm.can_allocate(head):
            victims = [s for s in self.running if s.priority > head.priority and not s.inflight]
            if not victims:
                return
            self.preempt(max(reversed(victims), key=lambda s: s.priority))

    def _room(self, seq: Sequence, chosen: set[int]) -> bool:
        """Blocks for every token of seq, preempting sequences not in flight (and not in this
        batch) until they fit, the latest priority's first, most recently admitted first among
        them; False if seq itself had to go."""
        while not self.bm.can_append(seq):
            victim = max(
                (s for s in reversed(self.running) if not s.inflight and id(s) not in chosen),
                key=lambda s: s.priority,
            )  # seq itself qualifies, so there is always one
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        if seq.filler:  # padding: nothing to compute again
            self.finish(seq)
            return
        self.bm.deallocate(seq)
        self.running.remove(seq)
        self.preemptions += 1
        self.requeue([seq])

    # -- results -------------------------------------------------------------------------------

    def postprocess(
        self, batch: MicroBatch, token_ids: list[int]
    ) -> tuple[list[Sequence], list[Sequence]]:
        """A generate step came back with one token per sample row: append them, register the
        blocks now computed, end the sequences that hit a stop condition (their blocks freed).
        Returns (sequences that got a token, sequences that finished)."""
        self.landed(batch)
        sampled = dict(zip(batch.sample, token_ids, strict=True))
        stepped: list[Sequence] = []
        finished: list[Sequence] = []
        for i, (seq, q) in enumerate(zip(batch.seqs, batch.seq_lens, strict=True)):
            seq.inflight = False
            if seq.status is not Status.RUNNING:
                continue  # cancelled (or late) while its step was inside
            seq.suspect = False
            seq.num_cached_tokens += q
            if i in sampled:
                token = sampled[i]
                seq.append(token)
                reason = self._stop(seq, token)
                if seq.filler:
                    if reason is not None:
                        self.finish(seq)
                        continue
                else:
                    stepped.append(seq)
                    if reason is not None:
                        if self.static == "padded":
                            self._pad(seq)
                        self.finish(seq, reason)
                        finished.append(seq)
                        continue
            self.bm.commit(seq)
        if self.static == "padded" and all(s.filler for s in self.running):
            for s in list(self.running):  # the batch's longest has ended: so does its padding
                self.finish(s)
        self.arrived.set()
        return stepped, finished

    def _pad(self, seq: Sequence) -> None:
        """Padded static batching (transformers' generate, FasterTransformer): a member that has
        ended keeps its place and computes on until the batch's longest ends. Its job is
        answered now; a filler takes its blocks and goes on, its tokens read by no one, up to
        the longest length any member may reach (within the model's positions, as each is)."""
        members = [s for s in self.running if not s.filler]
        longest = max(s.num_prompt_tokens + s.params.max_new_tokens for s in members if s.params)
        if members == [seq] or seq.num_tokens >= longest:
            return  # the last one, or as long as any: the batch ends with it
        filler = Sequence(
            seq.id,
            seq.task,
            list(seq.token_ids),
            SamplingParams(max_new_tokens=longest - seq.num_prompt_tokens, ignore_eos=True),
            oneshot=False,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            filler=True,
        )
        filler.block_table, seq.block_table = seq.block_table, []
        filler.num_hashed_blocks, filler.status = seq.num_hashed_blocks, Status.RUNNING
        self.running.append(filler)

    def landed(self, batch: MicroBatch) -> None:
        """A generate step left the pipeline (came back, was refused, or was never sent): its
        group may step again."""
        if batch.task == "generate" and batch.epoch == self.epoch:
            self.steps -= 1
            self.arrived.set()

    def _stop(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        assert p is not None
        if (token in self.eos and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if seq.num_completion_tokens >= p.max_new_tokens:
            return "length"
        return None

    def stats(self) -> dict[str, int]:
        return {
            "waiting": len(self.waiting),
            "running": len(self.running),
            "preemptions": self.preemptions,
        }
