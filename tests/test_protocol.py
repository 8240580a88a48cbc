"""The wire codec: round trips, typed refusals, and no exception but ProtocolError on any input."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wire.protocol import (
    CLIENT_KINDS,
    DTYPES,
    Code,
    Kind,
    Limits,
    ProtocolError,
    decode,
    encode,
    error,
    get,
)

LIMITS = Limits()


def header(**fields) -> bytes:
    return msgpack.packb({"v": 1, "kind": "ping", **fields}, use_bin_type=True)


def refused(frames, code: Code, limits: Limits = LIMITS, kinds=None) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        decode(frames, limits, kinds)
    assert e.value.code == code, e.value.message
    return e.value


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_round_trip_every_dtype(name):
    dtype = DTYPES[name]
    t = (torch.arange(24) % 7).to(dtype).reshape(2, 3, 4)
    frames = encode(Kind.RESULTS, {"results": [{"id": "a"}]}, [t, t[:, :1].contiguous()])
    msg = decode([bytes(f) for f in frames], LIMITS)
    assert msg.kind == "results" and msg.body == {"results": [{"id": "a"}]}
    assert [m.dtype for m in msg.tensors] == [dtype, dtype]
    assert torch.equal(msg.tensors[0], t) and msg.tensors[1].shape == (2, 1, 4)


def test_round_trip_edge_shapes():
    scalar, empty, noncontig = torch.tensor(3.5), torch.empty(0, 384), torch.ones(4, 3).t()
    msg = decode(
        [bytes(f) for f in encode("output", {"batch": 1}, [scalar, empty, noncontig])], LIMITS
    )
    assert msg.tensors[0].shape == () and msg.tensors[0].item() == 3.5
    assert msg.tensors[1].shape == (0, 384)
    assert torch.equal(msg.tensors[2], noncontig)


def test_round_trip_body_without_tensors():
    body = {"ref": 7, "ids": ["a", "b"], "nested": {"x": [1, 2.5, None, True, b"\x00"]}}
    msg = decode(encode(Kind.CANCEL, body), LIMITS, CLIENT_KINDS)
    assert msg.kind == Kind.CANCEL and msg.body == body and msg.tensors == []


def test_decoded_tensor_is_writable_and_owns_its_memory():
    frame = bytearray(torch.ones(4).numpy().tobytes())
    msg = decode([header(tensors=[{"dtype": "float32", "shape": [4]}]), frame], LIMITS)
    frame[:] = b"\x00" * 16  # the sender's buffer changing must not change the tensor
    msg.tensors[0] += 1
    assert msg.tensors[0].tolist() == [2.0] * 4


def test_error_message():
    msg = decode(error(Code.BUSY, "full", ref=3, retry_after_ms=50), LIMITS)
    assert msg.kind == "error" and msg.body == {
        "code": "busy",
        "message": "full",
        "ref": 3,
        "retry_after_ms": 50,
    }


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"\xc1"],  # never-used msgpack byte
        [b"\x93\x01"],  # truncated: array of 3 with one element
        [msgpack.packb({"v": 1, "kind": "ping"})[:-2]],
        [bytes(range(256))],
    ],
)
def test_garbage_is_malformed(frames):
    refused(frames, Code.MALFORMED)


@pytest.mark.parametrize("value", [[1, "ping"], "ping", 1, None])
def test_non_map_header(value):
    refused([msgpack.packb(value)], Code.MALFORMED)


def test_non_string_keys():
    refused([msgpack.packb({"v": 1, "kind": "ping", 3: "x"})], Code.MALFORMED)
    refused([msgpack.packb({"v": 1, "kind": "ping", "m": {1: 2}})], Code.MALFORMED)
    refused([msgpack.packb({"v": 1, "kind": "ping", b"k": 2}, use_bin_type=True)], Code.MALFORMED)


def test_ext_types_refused():
    packed = msgpack.packb({"v": 1, "kind": "ping", "x": msgpack.ExtType(1, b"evil")})
    refused([packed], Code.MALFORMED)
    # a timestamp is ext type -1: also refused, nothing but plain data crosses
    refused([msgpack.packb({"v": 1, "kind": "ping", "t": msgpack.Timestamp(1, 0)})], Code.MALFORMED)


@pytest.mark.parametrize("v", [None, 0, 2, "1", True, 1.0])
def test_wrong_version(v):
    fields = {"kind": "ping"} if v is None else {"v": v, "kind": "ping"}
    refused([msgpack.packb(fields)], Code.VERSION)


def test_unknown_kind():
    refused([msgpack.packb({"v": 1})], Code.UNKNOWN_KIND)
    refused([msgpack.packb({"v": 1, "kind": 5})], Code.UNKNOWN_KIND)
    refused([header()], Code.UNKNOWN_KIND, kinds={"submit"})
    refused(encode(Kind.READY), Code.UNKNOWN_KIND, kinds=CLIENT_KINDS)
    assert decode([header()], LIMITS, CLIENT_KINDS).kind == "ping"


def test_too_many_frames():
    t = torch.zeros(1)
    frames = encode("output", {}, [t] * 3)
    refused(frames, Code.TOO_MANY_FRAMES, Limits(max_frames=3))
    assert len(decode(frames, Limits(max_frames=4)).tensors) == 3


def test_too_many_bytes():
    frames = encode("output", {}, [torch.zeros(1000)])
    refused(frames, Code.TOO_LARGE, Limits(max_message_bytes=4000))
    decode(frames, Limits(max_message_bytes=5000))


@pytest.mark.parametrize(
    "descs, blobs",
    [
        ([{"dtype": "float32", "shape": [2]}], []),  # header describes more than there are
        ([], [b"1234"]),  # a frame nobody described
        (None, [b"1234"]),
        ("float32", [b"1234"]),
        ([{"dtype": "float32", "shape": [2]}], [b"1234"]),  # 8 bytes said, 4 sent
        ([{"dtype": "float32", "shape": [1]}], [b"12345"]),
        ([{"dtype": "float32", "shape": [0]}], [b"1"]),
        ([{"dtype": "float32"}], [b"1234"]),
        ([{"dtype": "float32", "shape": [1], "strides": [1]}], [b"1234"]),
        (["float32"], [b"1234"]),
    ],
)
def test_tensor_header_disagrees_with_frames(descs, blobs):
    refused([header(tensors=descs), *blobs], Code.BAD_TENSOR)


@pytest.mark.parametrize("dtype", ["float64", "complex64", "bool", "object", "", 4, None, ["f"]])
def test_bad_dtype(dtype):
    refused([header(tensors=[{"dtype": dtype, "shape": [1]}]), b"12345678"], Code.BAD_TENSOR)


@pytest.mark.parametrize(
    "shape",
    [
        [-1],
        [1.0],
        [True],
        ["2"],
        "2",
        {"0": 2},
        None,
        [1, 1, 1, 1, 2],  # more than 4 dims
        [0, 2**63],
        [0, 2**40, 2**40],  # empty, but unstridable
        [0, 2**62, 2],
    ],
)
def test_bad_shape(shape):
    refused(
        [header(tensors=[{"dtype": "uint8", "shape": shape}]), b"\x00\x00"[:0]], Code.BAD_TENSOR
    )


def test_get_checks_fields():
    body = {"n": 3, "flag": True, "ids": ["a"], "none": None}
    assert get(body, "n", int) == 3 and get(body, "flag", bool) is True
    assert get(body, "missing", int, 5) == 5 and get(body, "none", int, 0) == 0
    for name, kind in [("missing", int), ("flag", int), ("ids", str), ("n", (str, list))]:
        with pytest.raises(ProtocolError) as e:
            get(body, name, kind)
        assert e.value.code == Code.BAD_FIELD


# --- properties: garbage in, ProtocolError out, never anything else ---

SMALL = Limits(max_message_bytes=1 << 16, max_frames=8)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=4)
    ),
    max_leaves=12,
)
dims = st.integers(min_value=-2, max_value=2**64 - 1) | st.integers(min_value=0, max_value=4)
descs = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*DTYPES, "float64", ""]) | values,
        "shape": st.lists(dims, max_size=5) | values,
    }
)


def decodes_or_refuses(frames, kinds=None) -> None:
    try:
        msg = decode(frames, SMALL, kinds)
    except ProtocolError as e:
        assert isinstance(e.code, Code) and isinstance(e.message, str)
    else:
        assert isinstance(msg.kind, str) and isinstance(msg.body, dict)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=10))
def test_arbitrary_bytes_only_raise_protocol_error(frames):
    decodes_or_refuses(frames)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.text(max_size=6), values, max_size=4),
    st.one_of(st.just(1), values),
    st.one_of(st.sampled_from(["ping", "submit", "results"]), values),
    st.one_of(st.lists(descs, max_size=3), values),
    st.lists(st.binary(max_size=48), max_size=4),
)
def test_arbitrary_headers_only_raise_protocol_error(extra, v, kind, tensors, blobs):
    head = {**extra, "v": v, "kind": kind, "tensors": tensors}
    try:
        packed = msgpack.packb(head, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return  # not representable in msgpack: nothing a peer could send
    decodes_or_refuses([packed, *blobs], CLIENT_KINDS)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(DTYPES)),
    st.lists(st.integers(min_value=0, max_value=3), max_size=4),
    st.integers(min_value=-8, max_value=8),
)
def test_frame_length_must_match_shape(dtype, shape, skew):
    size = 1
    for n in shape:
        size *= n
    nbytes = size * DTYPES[dtype].itemsize
    blob = b"\x01" * max(0, nbytes + skew)
    frames = [header(tensors=[{"dtype": dtype, "shape": shape}]), blob]
    if len(blob) == nbytes:
        assert decode(frames, LIMITS).tensors[0].shape == tuple(shape)
    else:
        refused(frames, Code.BAD_TENSOR)


def test_refusals_carry_the_requests_ref_once_the_header_reads() -> None:
    header = msgpack.packb({"v": 1, "kind": "ping", "ref": 42})
    with pytest.raises(ProtocolError) as big:
        decode([header, b"\0" * 100], Limits(max_message_bytes=64))
    assert big.value.code == Code.TOO_LARGE and big.value.ref == 42
    with pytest.raises(ProtocolError) as unknown:
        decode([msgpack.packb({"v": 1, "kind": "nope", "ref": "r"})], Limits(), ("ping",))
    assert unknown.value.ref == "r"
    with pytest.raises(ProtocolError) as garbage:
        decode([b"\xc1"], Limits())
    assert garbage.value.ref is None
