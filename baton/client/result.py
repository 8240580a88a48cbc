"""What a job comes to on the client side: a Result, built from the broker's `results` entry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from wire.protocol import Code


@dataclass(slots=True)
class Result:
    id: str
    status: str  # "ok" | "error"
    embedding: list[float] | None = None
    tokens: int = 0
    truncated: bool = False
    error: dict | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict:
        """The CLI's output row."""
        if self.ok:
            return {
                "id": self.id,
                "status": "ok",
                "embedding": self.embedding,
                "tokens": self.tokens,
                "truncated": self.truncated,
            }
        return {"id": self.id, "status": "error", "error": self.error}


def failure(job_id: str, code: str, message: str) -> Result:
    return Result(job_id, "error", error={"code": str(code), "message": message})


def ok_result(entry: dict[str, Any], rows: torch.Tensor | None) -> Result:
    """An ok `results` entry as a Result; `rows` is the message's embeddings tensor, which
    entries of tasks that yield a vector name by `row`."""
    job_id = entry["id"]
    k = entry.get("row")
    row = None
    if k is not None:
        n_rows = len(rows) if rows is not None and rows.dim() == 2 else 0
        if not (isinstance(k, int) and 0 <= k < n_rows):
            return failure(job_id, Code.INTERNAL, f"results row {k!r} is missing")
        assert rows is not None
        row = rows[k].tolist()
    tokens = entry.get("tokens")
    return Result(
        job_id,
        "ok",
        row,
        tokens if isinstance(tokens, int) else 0,
        bool(entry.get("truncated", False)),
    )
