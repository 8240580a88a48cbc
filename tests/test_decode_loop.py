"""The controller's decode loop without processes: admission, streamed deltas, final results,
refused steps and a replica restart, against a scheduler and a stand-in pipeline."""

from __future__ import annotations

from typing import Any

from test_tasks import DECODER

from controller.block_manager import BlockManager
from controller.config import Config
from controller.controller import Controller
from controller.pipeline import Flight
from controller.scheduler import MicroBatch, Scheduler
from controller.tasks import Codec, tasks_of
from wire.protocol import Limits, decode


class Pipe:
    def __init__(self) -> None:
        self.inflight: dict[int, Flight] = {}

    def stats(self) -> dict[str, int]:
        return {}

    def send(self, batch: MicroBatch) -> int:
        n = len(self.inflight) + 100
        self.inflight[n] = Flight(n, batch)
        return n

    def take(self, n: int) -> Flight | None:
        return self.inflight.pop(n, None)

    def abandon(self) -> list[Flight]:
        lost, self.inflight = list(self.inflight.values()), {}
        return lost


class Link:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send_multipart(self, frames: list, copy: bool = True) -> None:
        msg = decode([bytes(f) for f in frames], Limits(1 << 30))
        self.sent.append((str(msg.kind), msg.body))

    def take(self, kind: str) -> list[dict[str, Any]]:
        out = [b for k, b in self.sent if k == kind]
        self.sent = [(k, b) for k, b in self.sent if k != kind]
        return out


def controller(blocks: int = 16) -> Controller:
    c = Controller.__new__(Controller)
    c.cfg = Config()
    c.limits = Limits(1 << 20)
    c.info = DECODER
    c.tasks = tasks_of(DECODER, Codec(DECODER))
    c.sched = Scheduler(64, 0, BlockManager(blocks, 4), eos_token_id=DECODER.eos_token_id)
    c.pipe = Pipe()  # type: ignore[assignment]
    c.link = Link()  # type: ignore[assignment]
    c.epoch, c.held, c.asked_jobs, c.asked_bytes, c.lane = 1, 0, 0, 0, True
    c.avg_cost, c.avg_bytes, c.capacity, c.target = 64.0, 512.0, 1000, 0
    c.executions = None
    return c


def job(jid: str, ids: list[int], **params: Any) -> dict[str, Any]:
    p = {"max_new_tokens": 3, "temperature": 0.0, "top_k": 0, "top_p": 1.0}
    p |= {"ignore_eos": False, "stop_token_ids": [], **params}
    return {"id": jid, "task": "generate", "token_ids": ids, "params": p, "attempts": 0}


def step(c: Controller, token: int = 5) -> MicroBatch:
    batch = c.sched.schedule()
    assert batch is not None
    c._finish_step(batch, [token] * len(batch.sample))
    return batch


def test_tokens_stream_as_deltas_and_the_result_ends_the_job() -> None:
    c = controller()
    c._accept([job("a", [1, 2, 3]), job("bad", []), {"id": "e", "task": "embed", "text": "x"}])
    link: Link = c.link  # type: ignore[assignment]
    errors = [r["error"]["code"] for m in link.take("results") for r in m["results"]]
    assert errors == ["empty_prompt", "unknown_task"] and c.held == 1
    step(c, 5)
    assert link.take("tokens") == [
        {"deltas": [{"id": "a", "index": 0, "token_ids": [5]}], "epoch": 1}
    ]
    step(c, 6)
    step(c, 7)
    assert [d["deltas"][0]["index"] for d in link.take("tokens")] == [1, 2]
    [msg] = link.take("results")
    # scheduled once it left the queue: how long it waited there, for the broker's histogram
    assert msg["results"][0].pop("queued_s") >= 0
    assert msg["results"] == [
        {
            "id": "a",
            "status": "ok",
            "token_ids": [5, 6, 7],
            "finish_reason": "length",
            "prompt_tokens": 3,
        }
    ]
    assert c.held == 0 and c.sched.bm.stats()["blocks_used"] == 0


def test_a_restart_recomputes_and_streams_nothing_twice() -> None:
    c = controller()
    c._accept([job("a", [1, 2, 3], max_new_tokens=4), job("b", [4, 5], max_new_tokens=4)])
    step(c)
    step(c)
    link: Link = c.link  # type: ignore[assignment]
    link.take("tokens")
    c.pipe.send(c.sched.schedule())  # a step inside when the worker dies
    # what _restart does before and after the new workers are up
    lost = [s for f in c.pipe.abandon() for s in f.batch.seqs]
    for s in lost:
        s.attempts += 1
        s.suspect = True
    c.sched.recompute_all()
    assert [s.id for s in c.sched.waiting] == ["a", "b"]
    assert all(s.num_cached_tokens == 0 and s.num_streamed == 2 for s in lost)
    step(c, 8)  # a recomputed alone (a suspect), b waits
    step(c, 8)
    [first, second] = link.take("tokens")
    assert first["deltas"] == [{"id": "a", "index": 2, "token_ids": [8]}]
    assert second["deltas"] == [{"id": "b", "index": 2, "token_ids": [8]}]
    while c.held:
        step(c, 9)
    done = {r["id"]: r["token_ids"] for m in link.take("results") for r in m["results"]}
    assert done == {"a": [5, 5, 8, 9], "b": [5, 5, 8, 9]}


def test_a_refused_step_runs_again_alone_then_ends() -> None:
    c = controller()
    c._accept([job("a", [1, 2]), job("b", [3, 4])])
    link: Link = c.link  # type: ignore[assignment]
    n = c.pipe.send(c.sched.schedule())
    c._on_refused({"batch": n, "stage": 1, "code": "internal", "message": "boom"})
    first = c.sched.schedule()
    assert [s.id for s in first.seqs] == ["a"]  # suspects go one at a time
    c._finish_step(first, [5])  # a's step is back: a is in the clear, b goes next, alone
    second = c.sched.schedule()
    assert [s.id for s in second.seqs] == ["b"]
    n = c.pipe.send(second)
    c._on_refused({"batch": n, "stage": 1, "code": "too_large", "message": "boom"})
    [msg] = link.take("results")
    assert [(r["id"], r["error"]["code"]) for r in msg["results"]] == [("b", "too_large")]
    assert c.sched.bm.stats()["blocks_used"] == 1  # a's block: it is still running


def test_cancel_frees_blocks_at_once() -> None:
    c = controller()
    c._accept([job("a", [1, 2, 3, 4, 5])])
    batch = c.sched.schedule()
    assert c.sched.bm.stats()["blocks_used"] == 2
    gone = c.sched.drop({"a"})
    c._done(len(gone))
    assert c.sched.bm.stats()["blocks_used"] == 0 and c.held == 0
    c._finish_step(batch, [1])  # the step comes back: nothing is sent for a cancelled job
    link: Link = c.link  # type: ignore[assignment]
    assert link.take("tokens") == [] and link.take("results") == []
