"""Fuzzing the gRPC KV wire format: bad bytes are rejected with the transport's errors, never crash a worker.

Three targets, each with bounded, derandomized hypothesis runs (reproducible in CI):
- the decoders on their own (decode_frame, FetchRequest.decode): anything that is not a
  well-formed frame raises KVCorruptError / ValueError, and what they accept is well-typed;
- a real importer (GrpcConnector.fetch) against a lying exporter, an in-process gRPC
  server that serves hypothesis-made frames (wrong sizes, CRCs, shapes, dtypes, types,
  seqs, extra fields, huge or negative numbers, truncated or oversized frames): every lie
  ends in a KVTransferError, and the importer keeps working;
- a real exporter (GrpcConnector's server) under fuzzed request frames and credentials:
  each refused with a gRPC status, no export consumed, and it keeps serving afterwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtransfer import KVConnector, KVCorruptError, KVHandle, KVTransferConfig, KVTransferError, make_connector
from kvtransfer.grpc_frames import (
    FRAME_SLACK,
    REQUEST_MAX_BYTES,
    DataFrame,
    EndFrame,
    FetchRequest,
    HeaderFrame,
    decode_frame,
)
from kvtransfer.grpc_transport import METHOD, SERVICE
from kvtransfer.payload import byte_view
from tests.test_kvtransfer import LAYOUT, export, make_blocks, same_bytes

CHUNK = 1024  # importer and fake exporter frame size: LAYOUT's 1 KiB blocks, one data frame per block
NUM_BLOCKS = 3
TOKEN = "fuzz-shared-token-0123456789"

# Derandomized: the same examples on every run, so CI cannot turn red by chance; bounded for < 60 s.
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_RPC = settings(FUZZ, max_examples=100)

INTS = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([-1, 0, 2**31, 2**63 - 1, 2**64 - 1, -(2**63)]))
MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | INTS | st.floats() | st.text(max_size=16) | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


# ---- valid frames, and ways to make them lie ------------------------------------------------------------

@pytest.fixture(scope="module")
def handle() -> Iterator[KVHandle]:
    """A genuine handle (real checksum and sizes) for a payload of NUM_BLOCKS blocks."""
    with make_connector(KVTransferConfig(transport="local")) as conn:
        yield export(conn, make_blocks(LAYOUT, NUM_BLOCKS, seed=31))


def _payload() -> bytes:
    return byte_view(make_blocks(LAYOUT, NUM_BLOCKS, seed=31)).tobytes()


def _valid_objs(h: KVHandle) -> list[dict]:
    """The frames an honest exporter sends for h, as msgpack maps (header, data..., end)."""
    header = msgpack.unpackb(HeaderFrame.from_handle(h).encode())
    data = _payload()
    chunks = [{"kind": "data", "seq": i, "data": data[o:o + CHUNK]} for i, o in enumerate(range(0, len(data), CHUNK))]
    return [header, *chunks, {"kind": "end", "frames": len(chunks), "nbytes": len(data)}]


def _different(value: Any) -> st.SearchStrategy:
    """Any msgpack value that is not `value` (also not equal to it, as 1 == 1.0 == True)."""
    return MSGPACK_VALUES.filter(lambda v: v != value or type(v) is not type(value))


@st.composite
def field_lies(draw: st.DrawFn, objs: list[dict]) -> list[dict]:
    """One frame with one field dropped, retyped, renumbered or added."""
    objs = [dict(o) for o in objs]
    target = draw(st.integers(0, len(objs) - 1))
    obj = objs[target]
    key = draw(st.sampled_from(sorted(obj)))
    how = draw(st.sampled_from(["drop", "replace", "number", "extra"]))
    if how == "drop":
        del obj[key]
    elif how == "replace":
        obj[key] = draw(_different(obj[key]))
    elif how == "number":
        obj[key] = draw(INTS.filter(lambda v, old=obj[key]: v != old or type(old) is not int))
    else:
        obj[draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in obj))] = draw(MSGPACK_VALUES)
    return objs


@st.composite
def header_lies(draw: st.DrawFn, objs: list[dict]) -> list[dict]:
    """A header that disagrees with the handle: shape, dtype, layout, sizes, checksum or hashes."""
    header = dict(objs[0])
    which = draw(st.sampled_from(["shape", "dtype", "layout", "nbytes", "checksum", "num_tokens", "first_block",
                                  "block_hashes"]))
    if which == "shape":
        shape = list(header["shape"])
        i = draw(st.integers(0, len(shape) - 1))
        shape[i] = draw(INTS.filter(lambda v, old=shape[i]: v != old))
        header["shape"] = shape
    elif which == "dtype":
        header["dtype"] = draw(st.sampled_from(["bfloat16", "float16", "int8", "float64", ""]))
    elif which == "layout":
        layout = dict(header["layout"])
        key = draw(st.sampled_from(sorted(layout)))
        layout[key] = draw(_different(layout[key]))
        header["layout"] = layout
    elif which == "block_hashes":
        header["block_hashes"] = draw(st.lists(st.binary(max_size=32), max_size=4).filter(
            lambda v: v != header["block_hashes"]))
    else:
        header[which] = draw(INTS.filter(lambda v, old=header[which]: v != old))
    return [header, *objs[1:]]


@st.composite
def stream_lies(draw: st.DrawFn, objs: list[dict]) -> list[dict]:
    """Frames in the wrong number or order, or data whose size or bytes are not the exported ones."""
    objs = [dict(o) for o in objs]
    data_at = list(range(1, len(objs) - 1))
    how = draw(st.sampled_from(["drop", "duplicate", "swap", "resize", "flip", "seq", "end", "no_end", "after_end",
                                "no_header", "two_headers"]))
    i = draw(st.sampled_from(data_at))
    if how == "drop":
        del objs[draw(st.integers(1, len(objs) - 1))]
    elif how == "duplicate":
        objs.insert(i, dict(objs[i]))
    elif how == "swap":
        objs[1], objs[2] = objs[2], objs[1]
    elif how == "resize":  # the header says N bytes, the stream carries M
        data = objs[i]["data"]
        size = draw(st.integers(0, 2 * CHUNK).filter(lambda n: n != len(data)))
        objs[i]["data"] = (data * 3)[:size]
    elif how == "flip":  # the CRC must catch it
        data = bytearray(objs[i]["data"])
        at = draw(st.integers(0, len(data) - 1))
        data[at] ^= draw(st.integers(1, 255))
        objs[i]["data"] = bytes(data)
    elif how == "seq":
        objs[i]["seq"] = draw(INTS.filter(lambda v, old=objs[i]["seq"]: v != old))
    elif how == "end":
        key = draw(st.sampled_from(["frames", "nbytes"]))
        objs[-1][key] = draw(INTS.filter(lambda v, old=objs[-1][key]: v != old))
    elif how == "no_end":
        objs.pop()
    elif how == "after_end":
        objs.append(dict(objs[draw(st.sampled_from(data_at))]))
    elif how == "no_header":
        objs.pop(0)
    else:
        objs.insert(i, dict(objs[0]))
    return objs


def _encoded(objs: list[Any]) -> list[bytes]:
    return [msgpack.packb(o) for o in objs]


@st.composite
def byte_lies(draw: st.DrawFn, frames: list[bytes]) -> list[bytes]:
    """Frames that are not msgpack maps: truncated, garbage, other types, ext types, or oversized."""
    frames = list(frames)
    i = draw(st.integers(0, len(frames) - 1))
    how = draw(st.sampled_from(["truncate", "garbage", "not_a_map", "ext", "oversized", "empty"]))
    if how == "truncate":
        frames[i] = frames[i][:draw(st.integers(0, len(frames[i]) - 1))]
    elif how == "garbage":
        frames.insert(i, draw(st.binary(min_size=1, max_size=64)))
    elif how == "not_a_map":
        frames[i] = msgpack.packb(draw(MSGPACK_VALUES.filter(lambda v: not isinstance(v, dict))))
    elif how == "ext":
        frames[i] = msgpack.packb({"kind": "data", "seq": 0, "data": msgpack.ExtType(draw(st.integers(0, 127)), b"x")})
    elif how == "oversized":  # over the importer's gRPC message limit: refused before it is read
        frames[i] = msgpack.packb({"kind": "data", "seq": 0, "data": b"\0" * (CHUNK + FRAME_SLACK + 1)})
    else:
        frames[i] = b""
    return frames


def lies(h: KVHandle) -> st.SearchStrategy[list[bytes]]:
    objs = _valid_objs(h)
    structured = st.one_of(field_lies(objs), header_lies(objs), stream_lies(objs)).map(_encoded)
    return st.one_of(structured, byte_lies(_encoded(objs)))


# ---- the decoders on their own --------------------------------------------------------------------------

def _assert_well_typed(frame: HeaderFrame | DataFrame | EndFrame) -> None:
    """What a decoder accepts has exactly the documented field types (no bools posing as ints)."""
    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if isinstance(frame, DataFrame):
        assert is_int(frame.seq) and isinstance(frame.data, bytes)
    elif isinstance(frame, EndFrame):
        assert is_int(frame.frames) and is_int(frame.nbytes)
    else:
        assert all(is_int(d) for d in frame.shape) and all(isinstance(b, bytes) for b in frame.block_hashes)
        assert all(is_int(v) for v in (frame.checksum, frame.nbytes, frame.num_tokens, frame.first_block))
        assert isinstance(frame.layout, dict) and isinstance(frame.dtype, str)


@FUZZ
@given(st.binary(max_size=512))
def test_decode_frame_on_random_bytes(data: bytes) -> None:
    try:
        frame = decode_frame(data)
    except KVCorruptError:
        return
    _assert_well_typed(frame)


@FUZZ
@given(data=st.data())
def test_decode_frame_rejects_every_field_lie(handle: KVHandle, data: st.DataObject) -> None:
    """A dropped, retyped or extra field makes a frame malformed; a renumbered one still decodes well-typed."""
    objs = data.draw(field_lies(_valid_objs(handle)))
    for raw in _encoded(objs):
        try:
            frame = decode_frame(raw)
        except KVCorruptError:
            continue
        _assert_well_typed(frame)


def test_decode_frame_rejects_what_is_not_in_the_wire_format(handle: KVHandle) -> None:
    valid = _valid_objs(handle)
    for obj in valid:
        decode_frame(msgpack.packb(obj))  # the honest frames decode
        for cut in range(len(msgpack.packb(obj))):
            with pytest.raises(KVCorruptError):
                decode_frame(msgpack.packb(obj)[:cut])
        with pytest.raises(KVCorruptError, match="unknown fields"):
            decode_frame(msgpack.packb({**obj, "extra": 1}))
        with pytest.raises(KVCorruptError):
            decode_frame(msgpack.packb(obj) + b"\x00")  # trailing bytes
    for bad in (msgpack.packb({"kind": "data", "seq": 0, "data": msgpack.ExtType(1, b"x")}),
                msgpack.packb({"kind": "end", "frames": msgpack.Timestamp(1), "nbytes": 0}, datetime=False),
                msgpack.packb({b"kind": "data", "seq": 0, "data": b""}),  # bytes keys
                msgpack.packb({"kind": "data", "seq": True, "data": b""}),
                msgpack.packb({**valid[0], "shape": [True, 2]}),
                b"\x91" * 100_000 + b"\xc0"):  # nesting far deeper than msgpack's stack
        with pytest.raises(KVCorruptError):
            decode_frame(bad)


@FUZZ
@given(st.one_of(
    st.binary(max_size=256),
    MSGPACK_VALUES.map(msgpack.packb),
    st.dictionaries(st.sampled_from(["export_id", "token", "kind", "x"]), MSGPACK_VALUES, max_size=3)
    .map(msgpack.packb),
))
def test_fetch_request_decode(data: bytes) -> None:
    try:
        req = FetchRequest.decode(data)
    except ValueError:
        return
    assert isinstance(req.export_id, str) and 0 < len(req.export_id) <= 128
    assert req.token is None or isinstance(req.token, str)


def test_fetch_request_size_is_bounded() -> None:
    with pytest.raises(ValueError, match="too large"):
        FetchRequest.decode(msgpack.packb({"export_id": "x", "token": "t" * REQUEST_MAX_BYTES}))


# ---- a real importer against a lying exporter -----------------------------------------------------------

class LyingExporter:
    """A gRPC server speaking the KV protocol that streams whatever frames the test sets (no checks at all)."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self._server = grpc.server(ThreadPoolExecutor(max_workers=2))
        handler = grpc.unary_stream_rpc_method_handler(self._serve)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Fetch": handler}),))
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def _serve(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from list(self.frames)

    def locate(self, h: KVHandle) -> KVHandle:
        return dataclasses.replace(h, transport="grpc", locator=f"{self.address}/{h.export_id}")

    def stop(self) -> None:
        self._server.stop(grace=None).wait()


@pytest.fixture(scope="module")
def liar() -> Iterator[LyingExporter]:
    server = LyingExporter()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def importer() -> Iterator[KVConnector]:
    with make_connector(KVTransferConfig(transport="grpc", chunk_bytes=CHUNK, timeout_s=5.0)) as conn:
        yield conn


def test_the_lying_exporter_tells_the_truth_by_default(liar: LyingExporter, importer: KVConnector,
                                                       handle: KVHandle) -> None:
    liar.frames = _encoded(_valid_objs(handle))
    assert same_bytes(importer.fetch(liar.locate(handle), LAYOUT), make_blocks(LAYOUT, NUM_BLOCKS, seed=31))


@FUZZ_RPC
@given(data=st.data())
def test_every_lie_is_a_transfer_error(liar: LyingExporter, importer: KVConnector, handle: KVHandle,
                                       data: st.DataObject) -> None:
    liar.frames = data.draw(lies(handle))
    failures = importer.stats.failures
    with pytest.raises(KVTransferError):
        importer.fetch(liar.locate(handle), LAYOUT)
    assert importer.stats.failures == failures + 1


@FUZZ_RPC
@given(frames=st.lists(st.one_of(
    MSGPACK_VALUES.map(msgpack.packb),
    st.fixed_dictionaries({"kind": st.just("data"), "seq": st.integers(0, NUM_BLOCKS), "data": st.binary(
        max_size=CHUNK)}).map(msgpack.packb),
    st.fixed_dictionaries({"kind": st.just("end"), "frames": INTS, "nbytes": INTS}).map(msgpack.packb),
), max_size=6))
def test_arbitrary_streams_fail_cleanly_or_deliver_the_exact_bytes(liar: LyingExporter, importer: KVConnector,
                                                                   handle: KVHandle, frames: list[bytes]) -> None:
    liar.frames = [HeaderFrame.from_handle(handle).encode(), *frames]
    try:
        out = importer.fetch(liar.locate(handle), LAYOUT)
    except KVTransferError:
        return
    assert same_bytes(out, make_blocks(LAYOUT, NUM_BLOCKS, seed=31))


def test_importer_still_works_after_the_fuzzing(liar: LyingExporter, importer: KVConnector,
                                                handle: KVHandle) -> None:
    test_the_lying_exporter_tells_the_truth_by_default(liar, importer, handle)


# ---- a real exporter under fuzzed requests --------------------------------------------------------------

@pytest.fixture(scope="module")
def exporter() -> Iterator[tuple[KVConnector, KVHandle]]:
    """A token-protected exporter holding one canary export that no fuzzed request names."""
    with make_connector(KVTransferConfig(transport="grpc", auth_token=TOKEN, lease_s=600)) as conn:
        yield conn, export(conn, make_blocks(LAYOUT, 2, seed=32))


REQUESTS = st.one_of(
    st.binary(max_size=128),
    MSGPACK_VALUES.map(msgpack.packb),
    st.fixed_dictionaries({"export_id": st.one_of(st.text(max_size=200), MSGPACK_VALUES)},
                          optional={"token": MSGPACK_VALUES, "extra": MSGPACK_VALUES}).map(msgpack.packb),
    st.integers(REQUEST_MAX_BYTES - 16, 4 * REQUEST_MAX_BYTES).map(lambda n: msgpack.packb({"export_id": "x" * n})),
)
GOOD_AUTH = ("authorization", f"Bearer {TOKEN}")


def _call(conn: KVConnector, request: bytes, metadata: tuple) -> grpc.StatusCode:
    with grpc.insecure_channel(conn.address) as channel:
        try:
            frames = list(channel.unary_stream(METHOD)(request, metadata=metadata, timeout=5.0))
        except grpc.RpcError as e:
            return e.code()
    raise AssertionError(f"a fuzzed request was served {len(frames)} frames")


@FUZZ_RPC
@given(request=REQUESTS)
def test_exporter_refuses_fuzzed_requests(exporter: tuple[KVConnector, KVHandle], request: bytes) -> None:
    conn, canary = exporter
    code = _call(conn, request, (GOOD_AUTH,))
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert conn.num_exports == 1 and conn.bytes_staged == canary.nbytes


@FUZZ_RPC
@given(request=REQUESTS, auth=st.lists(st.tuples(
    st.sampled_from(["authorization", "x-token", "token"]),
    st.one_of(st.just(TOKEN), st.just(f"bearer {TOKEN}"), st.just(f"Bearer {TOKEN[:-1]}"),
              st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=64)),
), max_size=3))
def test_exporter_refuses_fuzzed_credentials(exporter: tuple[KVConnector, KVHandle], request: bytes,
                                             auth: list[tuple[str, str]]) -> None:
    conn, canary = exporter
    refused = {grpc.StatusCode.UNAUTHENTICATED}
    if len(request) > REQUEST_MAX_BYTES:  # gRPC drops an over-long message before the handler sees the call
        refused.add(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert _call(conn, request, tuple(auth)) in refused
    assert conn.num_exports == 1 and conn.bytes_staged == canary.nbytes


def test_exporter_serves_the_canary_after_the_fuzzing(exporter: tuple[KVConnector, KVHandle]) -> None:
    conn, canary = exporter
    with make_connector(KVTransferConfig(transport="grpc", auth_token=TOKEN)) as rightful:
        assert same_bytes(rightful.fetch(canary, LAYOUT), make_blocks(LAYOUT, 2, seed=32))
    assert conn.num_exports == 0
