"""Validation at the door: one job of a `submit`, checked field by field, with every default of a
generate job filled in, against what the models served say (their tasks and generation bounds)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from broker.jobs import Job, new_id
from wire.limits import MAX_PRIORITY, MAX_STOP_TOKENS, Limits
from wire.protocol import Code, ProtocolError

MAX_ID_CHARS = 256
MAX_SEED = 2**63
FIELDS = frozenset({"id", "task", "text", "model", "deadline_ms", "priority"})
EMBED_FIELDS = FIELDS | {"token_ids", "dtype"}
# what an embed job's vector may travel and be kept as (field "dtype"); float16 halves the bytes
# of results, the journal and the broker's memory, and rounds as torch rounds
VECTOR_DTYPES = ("float32", "float16")
# a generate job's sampling fields, with their defaults (docs/protocol.md)
PARAMS: dict[str, Any] = {
    "max_new_tokens": 16,
    "temperature": 0.0,
    "top_k": 0,
    "top_p": 1.0,
    "seed": None,  # absent from the params sent when not given
    "ignore_eos": False,
    "stop_token_ids": [],
}
GENERATE_FIELDS = FIELDS | {"token_ids"} | set(PARAMS)


@dataclass(frozen=True, slots=True)
class Generation:
    """A decoder model's bounds, from its controller's `ready`."""

    vocab_size: int
    max_positions: int
    eos_token_id: int | None = None


@dataclass(frozen=True, slots=True)
class Embedding:
    """An encoder's bounds, from its controller's `ready`."""

    vocab_size: int


@dataclass(slots=True)
class Served:
    """What one model offers: its tasks and its bounds (from its controller's `ready`): a
    decoder's generation bounds, an encoder's embedding bounds; None where the controller
    does not say."""

    tasks: frozenset[str]
    generation: Generation | None = None
    embedding: Embedding | None = None


def validate(raw: Any, models: dict[str, Served], default_model: str, limits: Limits) -> Job:
    """One job of a `submit`, checked field by field; raises ProtocolError naming what is wrong."""
    if not isinstance(raw, dict):
        raise ProtocolError(Code.BAD_FIELD, f"a job must be a map, not {type(raw).__name__}")
    generate, embed = raw.get("task") == "generate", raw.get("task") == "embed"
    unknown = set(raw) - (GENERATE_FIELDS if generate else EMBED_FIELDS if embed else FIELDS)
    if unknown:
        raise ProtocolError(
            Code.BAD_FIELD, f"unknown job field(s): {', '.join(sorted(map(str, unknown)))}"
        )
    jid = raw.get("id")
    if jid is None:
        jid = new_id()
    elif not isinstance(jid, str) or not 0 < len(jid) <= MAX_ID_CHARS:
        raise ProtocolError(
            Code.BAD_FIELD, f"field 'id' must be a string of 1 to {MAX_ID_CHARS} characters"
        )
    model = raw.get("model") or default_model
    if not isinstance(model, str):
        raise ProtocolError(Code.BAD_FIELD, "field 'model' must be a string")
    task, text = raw.get("task"), raw.get("text")
    if not isinstance(task, str):
        raise ProtocolError(Code.BAD_FIELD, "field 'task' must be a string")
    if not (generate or embed) and not isinstance(text, str):
        raise ProtocolError(Code.BAD_FIELD, "field 'text' must be a string")
    served = _served(models, model, task)
    deadline = _deadline(raw)
    priority = raw.get("priority", 0)
    if (
        not isinstance(priority, int)
        or isinstance(priority, bool)
        or not 0 <= priority <= MAX_PRIORITY
    ):
        raise ProtocolError(
            Code.BAD_FIELD, f"field 'priority' must be an integer from 0 to {MAX_PRIORITY}"
        )
    if generate:
        job = _generate(raw, jid, model, served, limits, deadline)
        job.priority = priority
        return job
    if embed and (text is None) == (raw.get("token_ids") is None):
        raise ProtocolError(
            Code.BAD_FIELD, "an embed job takes exactly one of 'text' and 'token_ids'"
        )
    if text is None:
        job = _embed_ids(raw["token_ids"], jid, model, served, limits, deadline, priority)
    else:
        _text(text, limits, Code.EMPTY_TEXT, Code.TEXT_TOO_LONG)
        job = Job(jid, task, text, model, deadline=deadline, priority=priority)
    if embed:
        job.params = _vector(raw)
    return job


def _text(text: Any, limits: Limits, empty: Code, too_long: Code) -> None:
    """A job's `text`: a string, not blank (else `empty`), within the limit (else `too_long`);
    the codes are the task's."""
    if not isinstance(text, str):
        raise ProtocolError(Code.BAD_FIELD, "field 'text' must be a string")
    if not text.strip():
        raise ProtocolError(empty, "field 'text' is empty")
    if len(text) > limits.max_text_chars:
        raise ProtocolError(
            too_long, f"text has {len(text)} characters; at most {limits.max_text_chars}"
        )


def _vector(raw: dict[str, Any]) -> dict[str, Any] | None:
    """An embed job's options: {"dtype": "float16"} when asked; None for the default float32,
    so that jobs which do not ask stay as they were (in the journal, in their digest)."""
    dtype = raw.get("dtype", "float32")
    if dtype not in VECTOR_DTYPES:
        raise ProtocolError(
            Code.BAD_FIELD, f"field 'dtype' must be one of {', '.join(VECTOR_DTYPES)}"
        )
    return None if dtype == "float32" else {"dtype": dtype}


def _served(models: dict[str, Served], model: str, task: str) -> Served:
    served = models.get(model)
    if served is None:
        known = ", ".join(sorted(models)) or "none yet"
        raise ProtocolError(Code.UNKNOWN_MODEL, f"no model {model!r} is served (serving: {known})")
    if task not in served.tasks:
        raise ProtocolError(
            Code.UNKNOWN_TASK,
            f"model {model!r} does not do task {task!r} (it does: {', '.join(sorted(served.tasks))})",
        )
    return served


def _deadline(raw: dict[str, Any]) -> float | None:
    deadline_ms = raw.get("deadline_ms")
    if deadline_ms is not None and (
        not isinstance(deadline_ms, int) or isinstance(deadline_ms, bool) or deadline_ms <= 0
    ):
        raise ProtocolError(Code.BAD_FIELD, "field 'deadline_ms' must be a positive integer")
    return time.time() + deadline_ms / 1000 if deadline_ms else None


def _generate(
    raw: dict[str, Any],
    jid: str,
    model: str,
    served: Served,
    limits: Limits,
    deadline: float | None,
) -> Job:
    """A generate job: exactly one prompt (text or token_ids), its sampling fields with every
    default filled in, and what the model's bounds (if its controller gave them) allow.
    A text prompt's tokens are checked by the controller once it has tokenized them."""
    text, token_ids = raw.get("text"), raw.get("token_ids")
    if (text is None) == (token_ids is None):
        raise ProtocolError(
            Code.BAD_FIELD, "a generate job takes exactly one of 'text' and 'token_ids'"
        )
    params = _params(raw)
    gen = served.generation
    vocab = gen.vocab_size if gen is not None else None
    if text is not None:
        _text(text, limits, Code.EMPTY_PROMPT, Code.PROMPT_TOO_LONG)
        prompt = 1  # at least one token once tokenized
    else:
        _token_list(token_ids, "token_ids", limits.max_text_chars, vocab, Code.PROMPT_TOO_LONG)
        if not token_ids:
            raise ProtocolError(Code.EMPTY_PROMPT, "field 'token_ids' is empty")
        prompt = len(token_ids)
    _token_list(params["stop_token_ids"], "stop_token_ids", MAX_STOP_TOKENS, vocab, Code.BAD_FIELD)
    if gen is not None and prompt + params["max_new_tokens"] > gen.max_positions:
        raise ProtocolError(
            Code.PROMPT_TOO_LONG,
            f"{'at least 1' if text is not None else prompt} prompt tokens + max_new_tokens "
            f"{params['max_new_tokens']} exceed the model's {gen.max_positions} positions",
        )
    job = Job(jid, "generate", text or "", model, deadline=deadline)
    job.token_ids, job.params = token_ids, params
    return job


def _embed_ids(
    token_ids: Any,
    jid: str,
    model: str,
    served: Served,
    limits: Limits,
    deadline: float | None,
    priority: int,
) -> Job:
    """An embed job whose input came as token ids: the codes are the text path's (empty_text,
    text_too_long), since it is the same input in another form. Longer than the model's
    max_seq_length is not refused: the controller truncates it as it truncates a text."""
    vocab = served.embedding.vocab_size if served.embedding is not None else None
    _token_list(token_ids, "token_ids", limits.max_text_chars, vocab, Code.TEXT_TOO_LONG)
    if not token_ids:
        raise ProtocolError(Code.EMPTY_TEXT, "field 'token_ids' is empty")
    job = Job(jid, "embed", "", model, deadline=deadline, priority=priority)
    job.token_ids = token_ids
    return job


def _params(raw: dict[str, Any]) -> dict[str, Any]:
    """The sampling fields, typed and in range, defaults filled in; `seed` only when given."""
    out: dict[str, Any] = {}
    out["max_new_tokens"] = _int(raw, "max_new_tokens", 1)
    out["temperature"] = _float(raw, "temperature", lambda v: v >= 0, ">= 0")
    out["top_k"] = _int(raw, "top_k", 0)
    out["top_p"] = _float(raw, "top_p", lambda v: 0 < v <= 1, "in (0, 1]")
    if raw.get("seed") is not None:
        out["seed"] = _int(raw, "seed", 0)
        if out["seed"] >= MAX_SEED:
            raise ProtocolError(Code.BAD_FIELD, "field 'seed' must be below 2**63")
    ignore_eos = raw.get("ignore_eos", PARAMS["ignore_eos"])
    if not isinstance(ignore_eos, bool):
        raise ProtocolError(Code.BAD_FIELD, "field 'ignore_eos' must be a boolean")
    out["ignore_eos"] = ignore_eos
    stops = raw.get("stop_token_ids")
    out["stop_token_ids"] = list(PARAMS["stop_token_ids"]) if stops is None else stops
    return out


def _int(raw: dict[str, Any], name: str, least: int) -> int:
    value = raw.get(name)
    if value is None:
        return PARAMS[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ProtocolError(Code.BAD_FIELD, f"field {name!r} must be an integer >= {least}")
    return value


def _float(raw: dict[str, Any], name: str, ok: Any, what: str) -> float:
    value = raw.get(name)
    if value is None:
        return PARAMS[name]
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ProtocolError(Code.BAD_FIELD, f"field {name!r} must be a number {what}")
    value = float(value)
    if not math.isfinite(value) or not ok(value):
        raise ProtocolError(Code.BAD_FIELD, f"field {name!r} must be a number {what}")
    return value


def _token_list(value: Any, name: str, most: int, vocab: int | None, too_many: Code) -> None:
    """A list of token ids: at most `most` of them (else `too_many`), each in [0, vocab) when
    the vocabulary is known (and never negative)."""
    if not isinstance(value, list):
        raise ProtocolError(Code.BAD_FIELD, f"field {name!r} must be a list of integers")
    if len(value) > most:
        raise ProtocolError(too_many, f"field {name!r} has {len(value)} items; at most {most}")
    if not all(type(t) is int for t in value):
        raise ProtocolError(Code.BAD_FIELD, f"field {name!r} must be a list of integers")
    if value and (min(value) < 0 or (vocab is not None and max(value) >= vocab)):
        bad = next(t for t in value if t < 0 or (vocab is not None and t >= vocab))
        bound = f"[0, {vocab})" if vocab is not None else "[0, ...)"
        raise ProtocolError(
            Code.TOKEN_OUT_OF_RANGE, f"field {name!r}: token id {bad} is outside {bound}"
        )
