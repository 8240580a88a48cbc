"""What a job comes to on the client side: a Result, built from the broker's `results` entry."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from wire.protocol import Code


@dataclass(slots=True)
class Result:
    """A job's end. An embed job's carries `embedding`, `tokens` and `truncated`; a generate
    job's `token_ids` (the generated ones only), `text` (when the model has a tokenizer),
    `finish_reason` ("length" | "stop") and `prompt_tokens`; an error's `error`
    ({"code", "message"})."""

    id: str
    status: str  # "ok" | "error"
    embedding: list[float] | None = None
    tokens: int = 0
    truncated: bool = False
    error: dict | None = None
    token_ids: list[int] | None = None
    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict:
        """The CLI's output row: the fields of the job's task."""
        if not self.ok:
            return {"id": self.id, "status": "error", "error": self.error}
        if self.finish_reason is not None:
            return {
                "id": self.id,
                "status": "ok",
                "token_ids": self.token_ids,
                "text": self.text,
                "finish_reason": self.finish_reason,
                "prompt_tokens": self.prompt_tokens,
            }
        return {
            "id": self.id,
            "status": "ok",
            "embedding": self.embedding,
            "tokens": self.tokens,
            "truncated": self.truncated,
        }


@dataclass(frozen=True, slots=True)
class Delta:
    """One step of `Client.generate_stream`: `token_ids` are the generated tokens at positions
    `index`, `index + 1`, ... of the output. Deltas come in order without overlap, so their
    token_ids joined are the output so far. The last delta carries the job's `result` (ok or
    not) and whatever tokens of an ok result were not streamed before it; joined with the
    others they equal `result.token_ids`."""

    id: str
    index: int
    token_ids: list[int]
    result: Result | None = None

    @property
    def final(self) -> bool:
        return self.result is not None

    @property
    def finish_reason(self) -> str | None:
        return self.result.finish_reason if self.result is not None else None


def failure(job_id: str, code: str, message: str, retry_after_ms: Any = None) -> Result:
    """An error Result; a "not now" refusal keeps the broker's `retry_after_ms` hint."""
    error: dict[str, Any] = {"code": str(code), "message": message}
    if isinstance(retry_after_ms, int | float) and not isinstance(retry_after_ms, bool):
        error["retry_after_ms"] = retry_after_ms
    return Result(job_id, "error", error=error)


def ok_result(entry: dict[str, Any], tensors: Sequence[torch.Tensor]) -> Result:
    """An ok `results` entry as a Result; `tensors` are the message's embeddings (one per
    dtype), which entries of tasks that yield a vector name by `row` (and `tensor`, past the
    first). A float16 row's values are exact as floats."""
    job_id = entry["id"]
    k, t = entry.get("row"), entry.get("tensor", 0)
    row = None
    if k is not None:
        rows = tensors[t] if type(t) is int and 0 <= t < len(tensors) else None
        n_rows = len(rows) if rows is not None and rows.dim() == 2 else 0
        if not (isinstance(k, int) and 0 <= k < n_rows):
            return failure(job_id, Code.INTERNAL, f"results row {k!r} of tensor {t!r} is missing")
        assert rows is not None
        row = rows[k].tolist()
    if "finish_reason" in entry:  # a generate job's
        ids, text, prompt = entry.get("token_ids"), entry.get("text"), entry.get("prompt_tokens")
        if not (isinstance(ids, list) and all(type(t) is int for t in ids)):
            return failure(job_id, Code.INTERNAL, "results: token_ids is not a list of ints")
        return Result(
            job_id,
            "ok",
            token_ids=ids,
            text=text if isinstance(text, str) else None,
            finish_reason=str(entry["finish_reason"]),
            prompt_tokens=prompt if isinstance(prompt, int) else 0,
        )
    tokens = entry.get("tokens")
    return Result(
        job_id,
        "ok",
        row,
        tokens if isinstance(tokens, int) else 0,
        bool(entry.get("truncated", False)),
    )
