"""The wire format of GrpcConnector's one RPC: a request frame in, a header, data frames and an end frame out.

Wire format, msgpack only (never pickle), each frame a map with exactly these fields (any other is malformed):
  request  {export_id: str, token: str | nil}                  <= 4 KiB
  header   {kind: "header", request_id, export_id, block_hashes: [bin], layout: map,
            dtype, shape: [int], checksum, nbytes, num_tokens, first_block}
  data     {kind: "data", seq: int from 0, data: bin <= chunk_bytes}
  end      {kind: "end", frames: int, nbytes: int}
Bounds: every response frame is <= chunk_bytes + FRAME_SLACK bytes, enforced
by gRPC's max message length on both sides and re-checked per frame; the
importer allocates only handle.nbytes (<= max_payload_bytes) and rejects any
byte past it. Importer and exporter must use the same chunk_bytes (or the
importer a larger one).

Nothing from the network is unpickled: frames are msgpack with raw=False,
strict_map_key=True and ext types refused, and every field is type-checked. A bad request frame
raises ValueError (FetchRequest.decode), a bad response frame KVCorruptError (decode_frame).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from kvtransfer.errors import KVCorruptError, KVLayoutError
from kvtransfer.handle import KVHandle

FRAME_SLACK = 256 << 10  # bytes beyond chunk_bytes a frame may take: msgpack overhead, or a header of ~7k hashes
REQUEST_MAX_BYTES = 4 << 10


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not part of the wire format")


def _unpack(data: bytes) -> dict:
    """A msgpack map from untrusted bytes: str/bytes keys only, no ext types (so no timestamps or custom
    objects), container sizes bounded by len(data) (msgpack's default for unpackb). Raises ValueError."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0, ext_hook=_refuse_ext)
    except Exception as e:  # msgpack raises several types for malformed input; all mean "not a frame"
        raise ValueError(f"not msgpack: {type(e).__name__}") from e
    if not isinstance(obj, dict):
        raise ValueError("frame is not a map")
    return obj


def _only(obj: dict, allowed: frozenset[str]) -> None:
    """ValueError if obj has a field outside `allowed`: the wire format is exact, so an extra field is a
    peer speaking something else (or lying), never data to ignore."""
    extra = set(obj) - allowed
    if extra:
        raise ValueError(f"unknown fields {sorted(str(k)[:32] for k in extra)[:8]}")


def _need(obj: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"field {key!r} missing or not {kind}")
    return value


_REQUEST_FIELDS = frozenset({"export_id", "token"})
_FRAME_FIELDS = {  # kind -> the exact fields of a response frame of that kind
    "header": frozenset({"kind", "request_id", "export_id", "block_hashes", "layout", "dtype", "shape", "checksum",
                         "nbytes", "num_tokens", "first_block"}),
    "data": frozenset({"kind", "seq", "data"}),
    "end": frozenset({"kind", "frames", "nbytes"}),
}


@dataclass(frozen=True)
class FetchRequest:
    """The single request frame. token: the export's fetch token (KVHandle.fetch_token)."""

    export_id: str
    token: str | None = None

    def encode(self) -> bytes:
        return msgpack.packb({"export_id": self.export_id, "token": self.token})

    @classmethod
    def decode(cls, data: bytes) -> FetchRequest:
        """Raises ValueError on anything but {export_id: str (1-128 chars), token: str | nil}."""
        if len(data) > REQUEST_MAX_BYTES:
            raise ValueError("request frame too large")
        obj = _unpack(data)
        _only(obj, _REQUEST_FIELDS)
        export_id = _need(obj, "export_id", str)
        token = obj.get("token")
        if not 0 < len(export_id) <= 128 or not (token is None or isinstance(token, str)):
            raise ValueError("bad export_id or token")
        return cls(export_id, token)


@dataclass(frozen=True)
class HeaderFrame:
    """First response frame: what the payload is. Must equal the importer's handle field by field."""

    request_id: str
    export_id: str
    block_hashes: tuple[bytes, ...]
    layout: dict
    dtype: str
    shape: tuple[int, ...]
    checksum: int
    nbytes: int
    num_tokens: int
    first_block: int

    @classmethod
    def from_handle(cls, h: KVHandle) -> HeaderFrame:
        return cls(h.request_id, h.export_id, tuple(h.block_hashes), dict(h.layout), h.dtype, tuple(h.shape),
                   h.checksum, h.nbytes, h.num_tokens, h.first_block)

    def encode(self) -> bytes:
        return msgpack.packb({
            "kind": "header", "request_id": self.request_id, "export_id": self.export_id,
            "block_hashes": list(self.block_hashes), "layout": self.layout, "dtype": self.dtype,
            "shape": list(self.shape), "checksum": self.checksum, "nbytes": self.nbytes,
            "num_tokens": self.num_tokens, "first_block": self.first_block,
        })

    @classmethod
    def from_obj(cls, obj: dict) -> HeaderFrame:
        hashes = _need(obj, "block_hashes", list)
        shape = _need(obj, "shape", list)
        if (not all(isinstance(h, bytes) for h in hashes)
                or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
            raise ValueError("bad block_hashes or shape")
        return cls(_need(obj, "request_id", str), _need(obj, "export_id", str), tuple(hashes),
                   _need(obj, "layout", dict), _need(obj, "dtype", str), tuple(shape), _need(obj, "checksum", int),
                   _need(obj, "nbytes", int), _need(obj, "num_tokens", int), _need(obj, "first_block", int))

    def check_against(self, handle: KVHandle) -> None:
        """KVLayoutError if layout, dtype or shape differ from the handle; KVCorruptError for any other field."""
        if (self.layout, self.dtype, self.shape) != (handle.layout, handle.dtype, tuple(handle.shape)):
            raise KVLayoutError(f"export {handle.export_id}: served layout {self.layout} {self.dtype} {self.shape} "
                                f"!= handle {handle.layout} {handle.dtype} {tuple(handle.shape)}")
        if self != HeaderFrame.from_handle(handle):
            raise KVCorruptError(f"export {handle.export_id}: served header does not match the handle")


@dataclass(frozen=True)
class DataFrame:
    """One chunk of payload bytes, seq counting from 0."""

    seq: int
    data: bytes

    @staticmethod
    def encode_chunk(seq: int, chunk: memoryview) -> bytes:
        return msgpack.packb({"kind": "data", "seq": seq, "data": chunk})


@dataclass(frozen=True)
class EndFrame:
    """Last frame: how many data frames and bytes were sent."""

    frames: int
    nbytes: int

    def encode(self) -> bytes:
        return msgpack.packb({"kind": "end", "frames": self.frames, "nbytes": self.nbytes})


def decode_frame(data: bytes) -> HeaderFrame | DataFrame | EndFrame:
    """Raises KVCorruptError for anything that is not a well-formed response frame."""
    try:
        obj = _unpack(data)
        kind = obj.get("kind")
        if isinstance(kind, str) and kind in _FRAME_FIELDS:
            _only(obj, _FRAME_FIELDS[kind])
        if kind == "data":
            return DataFrame(_need(obj, "seq", int), _need(obj, "data", bytes))
        if kind == "header":
            return HeaderFrame.from_obj(obj)
        if kind == "end":
            return EndFrame(_need(obj, "frames", int), _need(obj, "nbytes", int))
        raise ValueError(f"unknown frame kind {str(kind)[:32]!r}")
    except ValueError as e:
        raise KVCorruptError(f"malformed frame: {e}") from e
