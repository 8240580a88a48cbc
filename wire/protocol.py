"""Baton wire protocol, version 1: msgpack envelopes with explicit kinds, tensors as raw frames.

A message is one or more ZeroMQ frames: a msgpack header (a map with string keys), then one raw
frame per tensor the header describes. See docs/protocol.md for every kind and its fields.
Nothing here ever unpickles: msgpack ext types are refused and tensors are rebuilt from an
allow-listed dtype and a shape whose size is checked against the frame before any decoding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgpack
import torch

from wire.limits import Limits

VERSION = 1


class Kind(StrEnum):
    # client -> broker
    SUBMIT = "submit"
    STATUS = "status"
    CANCEL = "cancel"
    PING = "ping"
    # broker -> client
    ACCEPTED = "accepted"
    RESULTS = "results"
    CANCELLED = "cancelled"
    PONG = "pong"
    ERROR = "error"
    # controller -> broker -> each client waiting on the job: generated tokens as they come
    TOKENS = "tokens"
    # controller <-> broker (STATUS, RESULTS and ERROR are reused)
    READY = "ready"
    CREDIT = "credit"
    JOBS = "jobs"
    REPORT = "report"
    HEARTBEAT = "heartbeat"
    STOP = "stop"
    # controller <-> workers
    HELLO = "hello"
    BATCH = "batch"
    OUTPUT = "output"
    FAILED = "failed"


CLIENT_KINDS = frozenset({Kind.SUBMIT, Kind.STATUS, Kind.CANCEL, Kind.PING})
CONTROLLER_KINDS = frozenset(
    {Kind.READY, Kind.CREDIT, Kind.RESULTS, Kind.TOKENS, Kind.REPORT, Kind.HEARTBEAT, Kind.ERROR}
)


class Code(StrEnum):
    """Typed error codes; a client can branch on these."""

    MALFORMED = "malformed"  # not a Baton message: bad msgpack, not a map, bad envelope
    VERSION = "unsupported_version"
    UNKNOWN_KIND = "unknown_kind"
    TOO_LARGE = "too_large"  # message bytes over the limit
    TOO_MANY_FRAMES = "too_many_frames"
    TOO_MANY_ITEMS = "too_many_items"  # a list in the message is longer than the limit allows
    BAD_TENSOR = "bad_tensor"  # tensor header disagrees with its frame, or dtype not allowed
    BAD_FIELD = "bad_field"  # a field is missing or has the wrong type or value
    UNKNOWN_TASK = "unknown_task"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_PEER = (
        "unknown_peer"  # a controller the broker does not (or no longer) know: re-register
    )
    EMPTY_TEXT = "empty_text"
    TEXT_TOO_LONG = "text_too_long"
    EMPTY_PROMPT = "empty_prompt"  # a generate job's prompt (text or token_ids) is empty
    PROMPT_TOO_LONG = "prompt_too_long"  # prompt tokens + max_new_tokens exceed the positions
    TOKEN_OUT_OF_RANGE = "token_out_of_range"  # a token id outside [0, vocab_size)
    BUSY = "busy"  # queue full; retry after the hinted delay
    DUPLICATE_ID = "duplicate_id"
    CANCELLED = "cancelled"
    DEADLINE = "deadline_exceeded"
    RETRIES_EXHAUSTED = "retries_exhausted"  # every attempt was lost to a dying worker/controller
    SHUTTING_DOWN = "shutting_down"
    JOURNAL_UNAVAILABLE = "journal_unavailable"  # cannot be made durable now; retry after the hint
    WORKER_FAILED = "worker_failed"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A typed refusal; `code` is one of Code and goes back to the sender as is."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref: Any = None  # the request's ref, when its header could be read


# Bytes a job adds to a `jobs` message beyond its id and text: keys, task, deadline, attempts,
# priority.
JOB_OVERHEAD = 96
# Bytes of a message that are not its items: kind, version, ref, map headers.
ENVELOPE = 1024
# msgpack's longest int (and float): a bound for any token id, whatever the model's vocabulary
INT_BYTES = 9
# a generate job's "token_ids" key and list header; its "params" map, every key and scalar value
TOKENS_OVERHEAD = 16
PARAMS_OVERHEAD = 160


def job_size(
    job_id: str,
    text: str = "",
    token_ids: Sized | None = None,
    params: Mapping[str, Any] | None = None,
) -> int:
    """An upper bound of the bytes one job takes in a `jobs` message (and in the broker's queue):
    its id, its text, and for a generate job its prompt `token_ids` and its `params` (as sent:
    every default filled in). A `jobs` entry `j` measures as
    `job_size(j["id"], j.get("text", ""), j.get("token_ids"), j.get("params"))`.

    Computed the same way on both sides of the broker <-> controller link, so that credit in
    bytes means the same thing to both. Lists count by length alone, so it stays O(1) per job.
    """
    n = _utf8_len(job_id) + _utf8_len(text) + JOB_OVERHEAD
    if token_ids is not None:
        n += TOKENS_OVERHEAD + INT_BYTES * len(token_ids)
    if params is not None:
        stops = params.get("stop_token_ids")
        n += PARAMS_OVERHEAD + INT_BYTES * (len(stops) if isinstance(stops, Sized) else 0)
    return n


def encodable(text: str) -> bool:
    """Whether msgpack can send `text` (valid UTF-8: no lone surrogates, which JSON allows)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _utf8_len(s: str) -> int:
    # ASCII (the common case) is one byte a character: no need to encode to count
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_DIMS = 4


@dataclass(slots=True)
class Message:
    kind: str
    body: dict[str, Any]
    tensors: list[torch.Tensor] = field(default_factory=list)


def fitted(build: Callable[[int, int], list], n: int, budget: int) -> Iterator[list]:
    """The messages for items [0, n), in order, each within `budget` bytes: `build(a, b)`
    encodes items a..b-1, and a message over the budget is built again as two halves. The
    common case (everything fits) costs one encoding and no per-item arithmetic; a single item
    over the budget goes alone (admission keeps such items out)."""
    todo = [(0, n)]
    while todo:
        a, b = todo.pop()
        frames = build(a, b)
        if b - a > 1 and sum(len(f) for f in frames) > budget:
            mid = (a + b) // 2
            todo += [(mid, b), (a, mid)]
            continue
        yield frames


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(Code.MALFORMED, f"msgpack ext type {code} is not allowed")


def _reject_timestamps(container: Any) -> Any:
    # the timestamp ext type (-1) is decoded by msgpack itself and never reaches ext_hook
    for v in container.values() if isinstance(container, dict) else container:
        if isinstance(v, msgpack.Timestamp):
            raise ProtocolError(Code.MALFORMED, "msgpack ext type -1 is not allowed")
    return container


def encode(
    kind: str, body: dict[str, Any] | None = None, tensors: Sequence[torch.Tensor] = ()
) -> list:
    """Header frame plus one raw frame per tensor (zero-copy views of CPU tensors)."""
    header: dict[str, Any] = {"v": VERSION, "kind": str(kind)}
    if body:
        header.update(body)
    frames: list = [b""]
    if tensors:
        descs = []
        for t in tensors:
            t = t.detach().to("cpu").contiguous()
            descs.append({"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)})
            frames.append(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
        header["tensors"] = descs
    frames[0] = msgpack.packb(header, use_bin_type=True)
    return frames


def decode(
    frames: Sequence[bytes | memoryview], limits: Limits, kinds: Iterable[str] | None = None
) -> Message:
    """Parse and check one message; raises ProtocolError with a typed code on anything amiss.

    Once the header is readable, the error carries the request's `ref`, so that even a refusal
    (too large, unknown kind, ...) matches the request it answers.
    """
    if not frames:
        raise ProtocolError(Code.MALFORMED, "empty message")
    if len(frames[0]) > limits.max_message_bytes:
        raise ProtocolError(Code.TOO_LARGE, f"header of {len(frames[0])} bytes")
    header = _header(frames[0], limits.max_items)
    ref = header.get("ref")
    try:
        return _check(header, frames, limits, kinds)
    except ProtocolError as e:
        e.ref = ref if isinstance(ref, (str, int, float, bool)) else None
        raise


def _header(frame: bytes | memoryview, max_items: int) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
            object_hook=_reject_timestamps,
            list_hook=_reject_timestamps,
            use_list=True,
            max_array_len=max_items,
            max_map_len=max_items,
        )
    except ProtocolError:
        raise
    except ValueError as e:
        if "exceeds max_" in str(e):
            raise ProtocolError(
                Code.TOO_MANY_ITEMS, f"a list or map of more than {max_items} items"
            ) from None
        raise ProtocolError(
            Code.MALFORMED, f"header is not valid msgpack: {type(e).__name__}"
        ) from None
    except Exception as e:  # msgpack raises several unrelated types for garbage input
        raise ProtocolError(
            Code.MALFORMED, f"header is not valid msgpack: {type(e).__name__}"
        ) from None
    if not isinstance(header, dict) or not all(isinstance(k, str) for k in header):
        raise ProtocolError(Code.MALFORMED, "header must be a map with string keys")
    return header


def _check(
    header: dict[str, Any],
    frames: Sequence[bytes | memoryview],
    limits: Limits,
    kinds: Iterable[str] | None,
) -> Message:
    if len(frames) > limits.max_frames:
        raise ProtocolError(
            Code.TOO_MANY_FRAMES, f"{len(frames)} frames; at most {limits.max_frames}"
        )
    size = sum(len(f) for f in frames)
    if size > limits.max_message_bytes:
        raise ProtocolError(Code.TOO_LARGE, f"{size} bytes; at most {limits.max_message_bytes}")
    # type check too: msgpack True and 1.0 compare equal to 1 but are not version 1
    if type(header.get("v")) is not int or header["v"] != VERSION:
        raise ProtocolError(
            Code.VERSION, f"protocol version {header.get('v')!r}; this side speaks {VERSION}"
        )
    kind = header.pop("kind", None)
    if not isinstance(kind, str) or (kinds is not None and kind not in kinds):
        raise ProtocolError(Code.UNKNOWN_KIND, f"unknown message kind {kind!r}")
    del header["v"]
    descs = header.pop("tensors", [])
    tensors = _tensors(descs, frames[1:])
    return Message(kind, header, tensors)


def _tensors(descs: Any, blobs: Sequence[bytes | memoryview]) -> list[torch.Tensor]:
    if not isinstance(descs, list) or len(descs) != len(blobs):
        raise ProtocolError(
            Code.BAD_TENSOR,
            f"header describes {_count(descs)} tensors, message has {len(blobs)} frames",
        )
    out = []
    for i, (d, blob) in enumerate(zip(descs, blobs, strict=True)):
        if not isinstance(d, dict) or set(d) != {"dtype", "shape"}:
            raise ProtocolError(Code.BAD_TENSOR, f"tensor {i}: header must be {{dtype, shape}}")
        dtype = DTYPES.get(d["dtype"]) if isinstance(d["dtype"], str) else None
        if dtype is None:
            raise ProtocolError(Code.BAD_TENSOR, f"tensor {i}: dtype {d['dtype']!r} not allowed")
        shape = d["shape"]
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
            # torch strides are int64: an empty tensor's other dims must still multiply within it
            or math.prod(max(n, 1) for n in shape) >= 2**63
        ):
            raise ProtocolError(Code.BAD_TENSOR, f"tensor {i}: bad shape {shape!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes != len(blob):
            raise ProtocolError(
                Code.BAD_TENSOR, f"tensor {i}: header says {nbytes} bytes, frame has {len(blob)}"
            )
        if nbytes == 0:
            out.append(torch.empty(shape, dtype=dtype))
        else:
            # bytearray: torch wants a writable buffer; one copy also detaches us from ZMQ's frame
            out.append(
                torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(dtype).reshape(shape)
            )
    return out


def _count(descs: Any) -> str:
    return str(len(descs)) if isinstance(descs, list) else "no list of"


def error(code: Code, message: str, **extra: Any) -> list:
    """An ERROR message, ready to send."""
    return encode(Kind.ERROR, {"code": str(code), "message": message, **extra})


# --- field checks shared by every receiver ---


def get(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """body[name] checked for type; a missing field takes `default`, or is an error if none."""
    if name not in body or body[name] is None:
        if default is ...:
            raise ProtocolError(Code.BAD_FIELD, f"field {name!r} is required")
        return default
    value = body[name]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ProtocolError(Code.BAD_FIELD, f"field {name!r} must be {_names(kind)}, not bool")
    if not isinstance(value, kind):
        raise ProtocolError(
            Code.BAD_FIELD, f"field {name!r} must be {_names(kind)}, not {type(value).__name__}"
        )
    return value


def _names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)
