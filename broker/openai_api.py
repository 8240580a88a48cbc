"""OpenAI's request and response shapes, in Baton's terms: request bodies read into Baton jobs
(refusing what Baton cannot honour, naming the field), results written back as OpenAI's
objects, and Baton's typed error codes (docs/protocol.md) mapped onto OpenAI's error shape and
HTTP status. Pure functions: the HTTP side is broker/gateway.py."""

from __future__ import annotations

import base64
import json
import math
from array import array
from dataclasses import dataclass, field
from typing import Any

from wire.limits import MAX_PRIORITY
from wire.protocol import Code

MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_SEED = 2**63


@dataclass(slots=True)
class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    retry_after_s: float | None = None  # 429 / 503: when to try again (Retry-After)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# Baton's job error codes -> (HTTP status, OpenAI error type); the code itself is passed on
STATUS: dict[str, tuple[int, str]] = {
    Code.MALFORMED: (400, "invalid_request_error"),
    Code.BAD_FIELD: (400, "invalid_request_error"),
    Code.UNKNOWN_TASK: (400, "invalid_request_error"),
    Code.EMPTY_TEXT: (400, "invalid_request_error"),
    Code.EMPTY_PROMPT: (400, "invalid_request_error"),
    Code.TOKEN_OUT_OF_RANGE: (400, "invalid_request_error"),
    Code.DUPLICATE_ID: (400, "invalid_request_error"),
    # OpenAI answers an over-long prompt with 400 context_length_exceeded
    Code.TEXT_TOO_LONG: (400, "invalid_request_error"),
    Code.PROMPT_TOO_LONG: (400, "invalid_request_error"),
    Code.TOO_LARGE: (413, "invalid_request_error"),
    Code.TOO_MANY_FRAMES: (413, "invalid_request_error"),
    Code.TOO_MANY_ITEMS: (413, "invalid_request_error"),
    Code.UNKNOWN_MODEL: (404, "invalid_request_error"),
    Code.BUSY: (429, "rate_limit_error"),
    Code.SHUTTING_DOWN: (503, "server_error"),
    Code.JOURNAL_UNAVAILABLE: (503, "server_error"),
    Code.DEADLINE: (504, "server_error"),
}
PARAMS = {  # the field a job error is about, in the request's terms
    Code.EMPTY_TEXT: "input",
    Code.TEXT_TOO_LONG: "input",
    Code.EMPTY_PROMPT: "prompt",
    Code.PROMPT_TOO_LONG: "prompt",
    Code.TOKEN_OUT_OF_RANGE: "prompt",
    Code.UNKNOWN_MODEL: "model",
    Code.UNKNOWN_TASK: "model",
}
# codes about a job's input, whatever the request calls it (`prompt`, `input`)
INPUT_CODES = frozenset(
    {
        Code.EMPTY_TEXT,
        Code.TEXT_TOO_LONG,
        Code.EMPTY_PROMPT,
        Code.PROMPT_TOO_LONG,
        Code.TOKEN_OUT_OF_RANGE,
    }
)
RENAMED = {  # Baton's code -> OpenAI's, where OpenAI has one for the same thing
    Code.UNKNOWN_MODEL: "model_not_found",
    Code.TEXT_TOO_LONG: "context_length_exceeded",
    Code.PROMPT_TOO_LONG: "context_length_exceeded",
    Code.BUSY: "rate_limit_exceeded",
}


def job_error(
    error: dict[str, Any] | None, where: str = "", input_param: str | None = None
) -> ApiError:
    """A job's `{"code", "message", "retry_after_ms"?}` as the HTTP error it stands for;
    `input_param` names the request's input field for the codes about it (else PARAMS)."""
    error = error or {}
    code = str(error.get("code", Code.INTERNAL))
    status, kind = STATUS.get(code, (500, "server_error"))
    hint = error.get("retry_after_ms")
    if code == Code.UNKNOWN_MODEL and hint is not None:
        status, kind = 503, "server_error"  # no model is served yet: the fleet is starting
    retry = None
    if status in (429, 503):
        retry = hint / 1000 if isinstance(hint, int | float) and hint > 0 else 1.0
    return ApiError(
        status,
        f"{where}{error.get('message') or code}",
        kind,
        input_param if input_param is not None and code in INPUT_CODES else PARAMS.get(code),
        RENAMED.get(code, code),
        retry,
    )


# --- reading requests ---


def read_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise bad(f"the request body is not valid JSON: {e}", code="malformed") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="malformed")
    return body


def _is_int(v: Any) -> bool:
    return type(v) is int


def _token_ids(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(t) for t in v)


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise bad(f"'{key}' must be a number", key)
    if not lo <= v <= hi:
        raise bad(f"'{key}' must be between {lo:g} and {hi:g}, got {v}", key)
    return float(v)


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: the name of a served model (GET /v1/models)", "model")
    return model


def _refuse_unsupported(body: dict, fields: dict[str, Any]) -> None:
    """OpenAI fields Baton cannot honour are refused unless they hold their neutral value."""
    for key, neutral in fields.items():
        v = body.get(key)
        if v is not None and v != neutral:
            raise bad(f"'{key}' is not supported by this server (only {neutral!r})", key)


@dataclass(slots=True)
class EmbeddingRequest:
    model: str
    # each input: a text, or token ids of the model's own tokenizer taken as the whole input
    texts: list[str | list[int]]
    base64: bool
    priority: int = 0


def priority(body: dict[str, Any]) -> int:
    """vLLM's `priority` extension: 0 (the default) first, higher later (Baton's job field)."""
    p = body.get("priority", 0)
    if not _is_int(p) or not 0 <= p <= MAX_PRIORITY:
        raise bad(f"'priority' must be an integer from 0 to {MAX_PRIORITY}", "priority")
    return p


def embedding_request(body: dict[str, Any]) -> EmbeddingRequest:
    model = _model(body)
    raw = body.get("input")
    if raw is None:
        raise bad("'input' is required: a string or a list of strings", "input")
    texts: list[str | list[int]]
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw):
        texts = list(raw)
    elif isinstance(raw, list) and raw and all(_is_int(t) for t in raw):
        texts = [raw]
    elif isinstance(raw, list) and raw and all(_token_ids(t) for t in raw):
        # an empty list among them is the broker's empty_text, as an empty string is
        texts = list(raw)
    else:
        raise bad(
            "'input' must be a non-empty string, a list of strings, a list of token ids or a "
            "list of lists of token ids",
            "input",
        )
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise bad("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    _refuse_unsupported(body, {"dimensions": None})
    return EmbeddingRequest(model, texts, fmt == "base64", priority(body))


def embedding_response(
    req: EmbeddingRequest, rows: list[list[float]], tokens: int
) -> dict[str, Any]:
    data = [
        {
            "object": "embedding",
            "index": i,
            # the rows are float32 on the wire: as base64 they travel bit for bit
            "embedding": base64.b64encode(array("f", row).tobytes()).decode()
            if req.base64
            else row,
        }
        for i, row in enumerate(rows)
    ]
    return {
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


@dataclass(slots=True)
class CompletionRequest:
    model: str
    prompts: list[str | list[int]]
    fields: dict[str, Any]  # the generate job's sampling fields (docs/protocol.md)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _prompts(raw: Any) -> list[str | list[int]]:
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(_is_int(t) for t in raw):
            return [raw]
        if all(isinstance(p, str) for p in raw):
            return list(raw)
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in raw):
            return list(raw)
    raise bad(
        "'prompt' must be a string, a list of strings, a list of token ids or a list of lists "
        "of token ids (none empty)",
        "prompt",
    )


def sampling(body: dict[str, Any], max_key: str = "max_tokens") -> dict[str, Any]:
    """The sampling fields shared by completions and chat completions, as a generate job's."""
    if body.get("n") not in (None, 1):
        raise bad("'n' must be 1: one completion per prompt", "n")
    _refuse_unsupported(
        body,
        {
            "best_of": 1,
            "echo": False,
            "logprobs": None if max_key == "max_tokens" else False,
            "top_logprobs": None,
            "suffix": None,
            "frequency_penalty": 0,
            "presence_penalty": 0,
            "logit_bias": {},
        },
    )
    out: dict[str, Any] = {"priority": priority(body)}
    limit = body.get(max_key)
    if limit is None and max_key != "max_tokens":
        limit = body.get("max_tokens")
    if limit is not None:
        if not _is_int(limit) or limit < 1:
            raise bad(f"'{max_key}' must be a positive integer", max_key)
        out["max_new_tokens"] = limit
    # OpenAI's defaults: temperature 1, top_p 1
    out["temperature"] = _number(body, "temperature", 1.0, 0.0, 2.0)
    out["top_p"] = _number(body, "top_p", 1.0, 0.0, 1.0)
    if out["top_p"] == 0:
        raise bad("'top_p' must be above 0", "top_p")
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed) or not 0 <= seed < MAX_SEED:
            raise bad(f"'seed' must be an integer in [0, 2**63), got {seed!r}", "seed")
        out["seed"] = seed
    # vLLM's extensions, which Baton's generate jobs have too
    top_k = body.get("top_k")
    if top_k is not None and top_k != -1:
        if not _is_int(top_k) or top_k < 0:
            raise bad("'top_k' must be a non-negative integer (-1 or 0: off)", "top_k")
        out["top_k"] = top_k
    if body.get("ignore_eos") is not None:
        if not isinstance(body["ignore_eos"], bool):
            raise bad("'ignore_eos' must be a boolean", "ignore_eos")
        out["ignore_eos"] = body["ignore_eos"]
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
            raise bad("'stop_token_ids' must be a list of token ids", "stop_token_ids")
        out["stop_token_ids"] = ids
    return out


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise bad(
            f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them", "stop"
        )
    return stops


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is None:
        return bool(stream), False
    if not stream:
        raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")
    usage = options.get("include_usage") if isinstance(options, dict) else None
    if not isinstance(options, dict) or not isinstance(usage, bool | None):
        raise bad(
            "'stream_options' must be an object with a boolean 'include_usage'", "stream_options"
        )
    return True, bool(usage)


def completion_request(body: dict[str, Any]) -> CompletionRequest:
    model = _model(body)
    if "prompt" not in body:
        raise bad("'prompt' is required", "prompt")
    prompts = _prompts(body["prompt"])
    stream, usage = _stream(body)
    return CompletionRequest(model, prompts, sampling(body), _stop(body), stream, usage)


def chat_request(body: dict[str, Any]) -> tuple[CompletionRequest, list[dict[str, Any]]]:
    """A chat completion as a completion of one prompt (rendered later from the messages by the
    model's chat template), and the messages."""
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of messages", "messages")
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # OpenAI's content parts: text ones only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise bad("only text content parts are supported", f"messages[{i}].content")
            content = "".join(str(p.get("text", "")) for p in content)
            m = {**m, "content": content}
            messages[i] = m
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad("each message must be an object with a string 'role'", f"messages[{i}]")
        if not isinstance(content, str | None):
            raise bad("a message's 'content' must be a string", f"messages[{i}].content")
    stream, usage = _stream(body)
    req = CompletionRequest(
        model, [], sampling(body, "max_completion_tokens"), _stop(body), stream, usage
    )
    return req, messages


# --- writing responses ---


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def sse(obj: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: JSON` (or `data: [DONE]`)."""
    text = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
