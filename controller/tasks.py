"""The controller's half of each task: admission (a job -> a Sequence, or a typed refusal) and the
result entry a finished Sequence becomes. A registry maps task names to types; which tasks a
replica serves follows from its model (an encoder embeds, a decoder generates; both echo).
"""

from __future__ import annotations

from typing import Any, ClassVar

from controller.sequence import Refusal, SamplingParams, Sequence
from wire.protocol import Code
from workers.loader import ModelInfo
from workers.models import load_info
from workers.tokenizer import Encoded, Tokenizer


def model_info(path: str, max_seq_length: int = 0) -> ModelInfo:
    """The one place the controller reads its model (the workers' loader reads it alike)."""
    info = load_info(path)
    if max_seq_length:
        info.max_seq_length = max_seq_length
    return info


class Codec:
    """Text <-> token ids with the model's own tokenizer (workers/tokenizer.py: an encoder
    truncates as sentence-transformers does, a decoder never does: a prompt too long for the
    model is refused instead). A model without tokenizer.json takes token ids only."""

    def __init__(self, model: ModelInfo) -> None:
        self.model = model
        self._tok = Tokenizer(model) if model.tokenizer is not None else None

    @property
    def has_text(self) -> bool:
        return self._tok is not None

    def encode(self, texts: list[str]) -> list[Encoded]:
        if not texts:
            return []
        if self._tok is None:
            raise Refusal(str(Code.BAD_FIELD), "this model has no tokenizer: send token_ids")
        return self._tok.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids) if self._tok is not None else ""


class Task:
    """A task type: how its jobs are admitted and what their result entries say."""

    name: ClassVar[str]
    oneshot: ClassVar[bool] = True

    def __init__(self, model: ModelInfo, codec: Codec) -> None:
        self.model, self.codec = model, codec

    def admit(self, jobs: list[dict[str, Any]]) -> list[Sequence | Refusal]:
        raise NotImplementedError

    def result(self, seq: Sequence, row: int | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def _inputs(self, jobs: list[dict[str, Any]]) -> list[Encoded | Refusal]:
        """Each job's input as token ids: its `token_ids` as sent (for the task to check), or
        its text tokenized (one batched call for all of them)."""
        encoded = iter(self._texts([j for j in jobs if "token_ids" not in j]))
        return [
            Encoded(j["token_ids"], truncated=False) if "token_ids" in j else next(encoded)
            for j in jobs
        ]

    def _texts(self, jobs: list[dict[str, Any]]) -> list[Encoded | Refusal]:
        """Each job's text tokenized (one batched call), or why it cannot be."""
        out: list[Encoded | Refusal | None] = [None] * len(jobs)
        todo = []
        for k, j in enumerate(jobs):
            if not isinstance(j.get("text"), str):
                out[k] = Refusal(str(Code.BAD_FIELD), f"a {self.name} job needs a text")
            else:
                todo.append(k)
        try:
            for k, e in zip(todo, self.codec.encode([jobs[k]["text"] for k in todo]), strict=True):
                out[k] = e
        except Refusal as r:
            for k in todo:
                out[k] = r
        return out  # type: ignore[return-value]


def checked_ids(ids: Any, vocab: int, empty: Code) -> list[int]:
    """Token ids as a job sent them, checked again here (the broker may not have known the
    vocabulary): ints, at least one (else `empty`), each in [0, vocab)."""
    if not isinstance(ids, list) or not all(type(t) is int for t in ids):
        raise Refusal(str(Code.BAD_FIELD), "token_ids must be a list of ints")
    if not ids:
        raise Refusal(str(empty), "token_ids is empty")
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise Refusal(str(Code.TOKEN_OUT_OF_RANGE), f"token id {bad} is outside [0, {vocab})")
    return list(ids)


def _seq(j: dict[str, Any], task: str, ids: list[int], **kw: Any) -> Sequence:
    return Sequence(
        j["id"],
        task,
        ids,
        attempts=j.get("attempts") or 0,
        deadline=j.get("deadline"),
        priority=j.get("priority") or 0,
        **kw,
    )


class Embed(Task):
    name = "embed"

    def admit(self, jobs: list[dict[str, Any]]) -> list[Sequence | Refusal]:
        out: list[Sequence | Refusal] = []
        for j, e in zip(jobs, self._inputs(jobs), strict=True):
            if not isinstance(e, Refusal) and "token_ids" in j:
                e = self._ids(e.ids)
            out.append(
                e if isinstance(e, Refusal) else _seq(j, self.name, e.ids, truncated=e.truncated)
            )
        return out

    def _ids(self, ids: Any) -> Encoded | Refusal:
        """Token ids taken as the whole input, special tokens as sent; past max_seq_length
        they are cut and flagged, as a text is (its end, [SEP] included, is what goes)."""
        try:
            ids = checked_ids(ids, self.model.vocab_size, Code.EMPTY_TEXT)
        except Refusal as r:
            return r
        keep = self.model.max_seq_length
        return Encoded(ids[:keep], truncated=len(ids) > keep)

    def result(self, seq: Sequence, row: int | None = None) -> dict[str, Any]:
        entry = {"id": seq.id, "status": "ok", "tokens": seq.num_tokens, "truncated": seq.truncated}
        if row is not None:
            entry["row"] = row  # its embedding's row in the message's tensor
        return entry


class Echo(Task):
    """Routed through every stage like any batch, nothing computed: measures the path."""

    name = "echo"

    def admit(self, jobs: list[dict[str, Any]]) -> list[Sequence | Refusal]:
        return [_seq(j, self.name, []) for j in jobs]

    def result(self, seq: Sequence, row: int | None = None) -> dict[str, Any]:
        return {"id": seq.id, "status": "ok", "tokens": 0, "truncated": False}


class Generate(Task):
    name = "generate"
    oneshot = False

    def __init__(self, model: ModelInfo, codec: Codec) -> None:
        super().__init__(model, codec)
        self.kv_tokens = 0  # tokens the KV cache holds (0 = not known yet); set by the controller

    def admit(self, jobs: list[dict[str, Any]]) -> list[Sequence | Refusal]:
        out: list[Sequence | Refusal] = []
        for j, e in zip(jobs, self._inputs(jobs), strict=True):
            try:
                if isinstance(e, Refusal):
                    raise e
                out.append(self.check(j, e.ids))
            except Refusal as r:
                out.append(r)
        return out

    def check(self, j: dict[str, Any], ids: Any) -> Sequence:
        """The prompt and its parameters, checked against the model and the KV cache."""
        ids = checked_ids(ids, self.model.vocab_size, Code.EMPTY_PROMPT)
        params = SamplingParams.parse(j.get("params"))
        need = len(ids) + params.max_new_tokens
        if need > self.model.max_position:
            raise Refusal(
                str(Code.PROMPT_TOO_LONG),
                f"{len(ids)} prompt tokens + max_new_tokens {params.max_new_tokens} exceed the "
                f"model's {self.model.max_position} positions",
            )
        if self.kv_tokens and need > self.kv_tokens:
            raise Refusal(
                str(Code.PROMPT_TOO_LONG),
                f"{len(ids)} prompt tokens + max_new_tokens {params.max_new_tokens} exceed the "
                f"KV cache's {self.kv_tokens} tokens (raise kv.memory)",
            )
        return _seq(j, self.name, ids, params=params, oneshot=False)

    def result(self, seq: Sequence, row: int | None = None) -> dict[str, Any]:
        ids = seq.completion_token_ids
        entry: dict[str, Any] = {"id": seq.id, "status": "ok", "token_ids": ids}
        if self.codec.has_text:
            entry["text"] = self.codec.decode(ids)
        entry["finish_reason"] = seq.finish_reason
        entry["prompt_tokens"] = seq.num_prompt_tokens
        return entry


def timed(entry: dict[str, Any], seq: Sequence) -> dict[str, Any]:
    """A result entry with `queued_s`, the seconds the job waited here before its first batch
    (absent if it never had one); the broker adds its own wait and keeps the figure."""
    if (waited := seq.queued_s) is not None:
        entry["queued_s"] = waited
    return entry


TASKS: dict[str, type[Task]] = {t.name: t for t in (Embed, Echo, Generate)}


def tasks_of(model: ModelInfo, codec: Codec) -> dict[str, Task]:
    """The tasks this model serves, by name, in the order `ready` lists them."""
    names = ("generate", "echo") if model.decoder else ("embed", "echo")
    return {n: TASKS[n](model, codec) for n in names}


def bounds(model: ModelInfo) -> dict[str, Any]:
    """What the controller's `ready` tells the broker to check jobs against: a decoder's
    "generation", an encoder's "embedding"."""
    if not model.decoder:
        return {"embedding": {"vocab_size": model.vocab_size}}
    return {
        "generation": {
            "vocab_size": model.vocab_size,
            "max_positions": model.max_position,
            "eos_token_id": model.eos_token_id,
        }
    }
