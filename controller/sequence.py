"""One job as the controller holds it: a `Sequence` of token ids, and how to sample its next ones.

Every task is a Sequence. An embed or echo job runs once (its whole prompt in one step, no KV
blocks); a generate job grows by one token a step until a stop condition holds, and its K/V live
in KV-cache blocks named by `block_table` (see block_manager.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any, ClassVar

SEED_LIMIT = 2**63


class Refusal(Exception):
    """A job refused at admission; `code` is a wire error code (str), sent back as is."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(slots=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def parse(cls, raw: Any) -> SamplingParams:
        """The broker's "params" map (every default filled in), checked again here: a bad value
        would otherwise reach the workers' sampler. Raises Refusal("bad_field", ...)."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise Refusal("bad_field", "params must be a map")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise Refusal("bad_field", f"unknown sampling field(s): {', '.join(sorted(unknown))}")
        p = cls()
        for name in ("max_new_tokens", "top_k"):
            if name in raw:
                setattr(p, name, _int(raw[name], name))
        for name in ("temperature", "top_p"):
            if name in raw:
                v = raw[name]
                if isinstance(v, bool) or not isinstance(v, int | float) or v != v:
                    raise Refusal("bad_field", f"{name} must be a number, got {v!r}")
                setattr(p, name, float(v))
        if raw.get("seed") is not None:
            p.seed = _int(raw["seed"], "seed")
        if "ignore_eos" in raw:
            if not isinstance(raw["ignore_eos"], bool):
                raise Refusal("bad_field", f"ignore_eos must be a bool, got {raw['ignore_eos']!r}")
            p.ignore_eos = raw["ignore_eos"]
        if "stop_token_ids" in raw:
            stops = raw["stop_token_ids"]
            if not isinstance(stops, list):
                raise Refusal("bad_field", "stop_token_ids must be a list of ints")
            p.stop_token_ids = [_int(t, "stop_token_ids") for t in stops]
        if p.max_new_tokens < 1:
            raise Refusal("bad_field", f"max_new_tokens must be >= 1, got {p.max_new_tokens}")
        if p.temperature < 0:
            raise Refusal("bad_field", f"temperature must be >= 0, got {p.temperature}")
        if p.top_k < 0:
            raise Refusal("bad_field", f"top_k must be >= 0, got {p.top_k}")
        if not 0 < p.top_p <= 1:
            raise Refusal("bad_field", f"top_p must be in (0, 1], got {p.top_p}")
        if p.seed is not None and not 0 <= p.seed < SEED_LIMIT:
            raise Refusal("bad_field", f"seed must be in [0, 2**63), got {p.seed}")
        return p


def _int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise Refusal("bad_field", f"{name} must be an int, got {v!r}")
    return v


@dataclass(slots=True, eq=False)  # identity equality: two jobs are never the same sequence
class Sequence:
    # one KV block holds this many tokens; set by the BlockManager (one size per controller)
    block_size: ClassVar[int] = 16

    id: str
    task: str
    token_ids: list[int]  # the prompt, then every token generated so far
    params: SamplingParams | None = None  # generate only
    attempts: int = 0  # runs lost before this one
    deadline: float | None = None  # wall-clock seconds
    priority: int = 0  # 0 first; higher waits, and may be preempted, for lower (scheduler.py)
    aged: bool = False  # served as priority 0 for having waited (scheduler.AGE_S), not sent so
    truncated: bool = False  # embed: the text was cut to max_seq_length
    oneshot: bool = True  # runs once, whole (embed, echo); False: generates step by step
    num_prompt_tokens: int = -1  # -1: all of token_ids at creation
    num_cached_tokens: int = 0  # tokens whose K/V are in the cache (computed or shared)
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks of block_table registered for prefix sharing
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "length" | "stop"
    inflight: bool = False  # inside a micro-batch in the pipeline: not schedulable
    suspect: bool = False  # lost with a dying worker or a refused batch: its next step runs alone
    num_streamed: int = 0  # generated tokens already sent to the broker as `tokens` deltas
    filler: bool = False  # padded static batching: computes on after its job ended, unread
    turn: int = 0  # the scheduler's step count when it last joined a step: least recent first
    arrived: float = field(default_factory=time.monotonic)
    scheduled: float | None = None  # monotonic: it first left the queue for a batch (or step)

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)
        self.suspect = self.attempts > 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def cost(self) -> int:
        """Budget units while waiting: tokens still to compute, and at least 1 so token-free
        tasks (echo) still fill batches."""
        return max(1, len(self.token_ids) - self.num_cached_tokens)

    @property
    def num_blocks(self) -> int:
        return (len(self.token_ids) + self.block_size - 1) // self.block_size

    @property
    def last_block_num_tokens(self) -> int:
        return len(self.token_ids) - (self.num_blocks - 1) * self.block_size

    def block(self, i: int) -> list[int]:
        """The tokens of block i."""
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    @property
    def interactive(self) -> bool:
        """Sent at priority 0, the interactive level (not aged into it)."""
        return self.priority == 0 and not self.aged

    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def start(self) -> None:
        """Out of the queue into a batch (a step, for generation); the first time is kept."""
        self.status = Status.RUNNING
        if self.scheduled is None:
            self.scheduled = time.monotonic()

    @property
    def queued_s(self) -> float | None:
        """Seconds it waited here before its first batch; None while it has had none."""
        return None if self.scheduled is None else self.scheduled - self.arrived
