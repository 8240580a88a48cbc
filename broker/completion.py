"""One completion's choices: a generate job's token stream as text events cut at the first stop
string, and the OpenAI shapes of a completion and of its stream's chunks. The gateway's routes
and the Batch API's completion lines (broker/batch_lines.py) share them, so that a stop cuts the
same text in both and both answer in the same shape.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from baton.client import Delta, Result
from broker import openai_api as api
from broker.openai_api import ApiError, CompletionRequest
from broker.texts import Incremental, Texts


@dataclass(slots=True)
class Event:
    """What one choice of a completion yields: new text, then its end (or an error)."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: ApiError | None = None
    # on the last event: the job's own end, or None when a stop string ended the choice while
    # the job still ran (whoever streamed it then cancels it)
    result: Result | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


async def until_stop(
    index: int,
    deltas: AsyncIterator[Delta],
    texts: Texts,
    stops: list[str],
    prompt: str | list[int],
) -> AsyncIterator[Event]:
    """One generate job's stream as the text events of choice `index`, ended at the first stop
    string without waiting for the job to end: what the gateway's routes and the Batch API's
    completion lines share, so a stop cuts the same text in both. Text that may be the start of
    a stop string is held back until it is known not to be. The last event is final: the job's
    end (`finish_reason`, or `error`), or "stop" with `result` None when a stop string came
    first, the job still running: the caller cancels it."""
    hold = max((len(s) for s in stops), default=1) - 1  # a stop may be forming at the end
    text = Incremental(texts)
    sent = 0  # characters of the text already put out
    async for delta in deltas:
        result = delta.result
        if result is not None and not result.ok:
            yield Event(index, error=api.job_error(result.error), result=result)
            return
        so_far = text.add(delta.token_ids)
        if result is not None and result.text is not None:
            so_far = result.text  # what the controller decoded is the answer
        cut = first_stop(so_far, stops, max(0, sent - hold))
        if cut is not None or result is not None:
            reason = "stop" if cut is not None else (result.finish_reason or "stop")
            end = cut if cut is not None else len(so_far)
            prompt_tokens = result.prompt_tokens if result else texts.count(prompt)
            yield Event(
                index, so_far[sent:end], reason, prompt_tokens, len(text.ids), result=result
            )
            return
        safe = len(so_far) - (hold if stops else 0)
        if safe > sent:
            yield Event(index, so_far[sent:safe])
            sent = safe


def first_stop(text: str, stops: list[str], start: int) -> int | None:
    """Where the first stop string begins in text (searched from `start`), or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def chunk_head(req: CompletionRequest, chat: bool) -> dict[str, Any]:
    prefix, kind = ("chatcmpl-", "chat.completion.chunk") if chat else ("cmpl-", "text_completion")
    return {
        "id": prefix + uuid.uuid4().hex,
        "object": kind,
        "created": int(time.time()),
        "model": req.model,
    }


def chunk(
    head: dict[str, Any],
    index: int,
    content: str | dict[str, Any],
    chat: bool,
    finish_reason: str | None = None,
    req: CompletionRequest | None = None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index}
    if chat:
        choice["delta"] = content
    else:
        choice["text"] = content
    choice["logprobs"] = None
    choice["finish_reason"] = finish_reason
    out = {**head, "choices": [choice]}
    if req is not None and req.include_usage:
        out["usage"] = None  # OpenAI's: only the last chunk carries usage
    return out


def completion(
    req: CompletionRequest, chat: bool, texts: list[str], ends: dict[int, Event]
) -> dict[str, Any]:
    head = chunk_head(req, chat)
    head["object"] = "chat.completion" if chat else "text_completion"
    choices = []
    for i, text in enumerate(texts):
        choice: dict[str, Any] = {"index": i}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        choice["finish_reason"] = ends[i].finish_reason
        choices.append(choice)
    prompt = sum(e.prompt_tokens for e in ends.values())
    done = sum(e.completion_tokens for e in ends.values())
    return {**head, "choices": choices, "usage": api.usage(prompt, done)}
