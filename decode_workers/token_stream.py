"""Direct token streams: a decode worker's outputs to the ingress over one TCP connection.

Why: through a Serve streaming call, every output of every request is its own Ray message
(serialized, sent, received, deserialized, one wake-up of each process's threads). A decode
step of four requests made four. Here the ingress listens on a port; a request names that
address, a stream id and the ingress's secret; the decode worker keeps one connection per
ingress and writes all the outputs of one event-loop turn, for every stream it serves there,
as one frame. The engine hands a step's outputs to the event loop in one turn, so that is one
frame per step per ingress. The request itself (routing, admission, errors, cancellation, a
replica's death) stays the Serve call it was; only the tokens take this path.

Wire: frames of a 4-byte big-endian length and a msgpack body. The connecting side sends the
secret as its first frame; the server answers one byte (ACK) and from then on only reads.
Every later frame is a list of [stream_id, output] pairs, output being a StepOutput as a dict.
A body is at most MAX_FRAME_BYTES (the secret's: MAX_HELLO_BYTES); read_frame refuses a longer one
before reading it.

Security (TokenStreamSecurity): every connection presents the secret; the outputs are the users'
answers, so plaintext stays on loopback. A server beyond loopback uses TLS (the target names the CA
the worker checks the ingress's certificate against) or is explicitly allowed plaintext; otherwise
the ingress does not open one and tokens travel inside Serve's calls, under Ray's own security.

The two ends live apart: the ingress's in decode_workers.token_stream_server (TokenStreamServer),
the decode worker's in decode_workers.token_stream_sender (TokenStreamSender). This module holds what
both speak: the framing (encode_frame, read_frame, ACK, the size bounds in bytes), where a request's
outputs go (TokenStreamTarget) and how a server may listen (TokenStreamSecurity).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as config_dataclass

from kvtransfer.config import check_tls_files, is_loopback

MAX_FRAME_BYTES = 8 << 20  # far above one frame of outputs (a step's tokens for every stream)
MAX_HELLO_BYTES = 1024
CONNECT_TIMEOUT_S = 10.0
ACK = b"\x01"
_LEN = 4


class TokenStreamError(ConnectionError):
    """The direct token stream to the ingress failed or was refused."""


@config_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class TokenStreamSecurity:
    """How the ingress's token-stream server may listen (PEM paths; all three TLS files or none).

    tls_ca_file must be readable at the same path on every decode node (a mounted secret): workers
    check the ingress's certificate against it. tls_server_name: the name they expect in it, when
    it is not the address they dial. allow_plaintext: accept plaintext beyond loopback.
    """

    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_ca_file: str | None = None
    tls_server_name: str | None = None
    allow_plaintext: bool = False

    def __post_init__(self) -> None:
        check_tls_files(self.tls_cert_file, self.tls_key_file, self.tls_ca_file, self.tls_server_name, "token stream")

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    def permits(self, host: str) -> bool:
        """True if a server on `host` may carry outputs: loopback, TLS, or plaintext allowed."""
        return self.tls or self.allow_plaintext or is_loopback(host)

    def server_context(self) -> ssl.SSLContext | None:
        """The server's TLS context, or None for plaintext. Raises OSError/ssl.SSLError on bad files."""
        if not self.tls:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        return context


@dataclass(frozen=True)
class TokenStreamTarget:
    """Where one request's outputs go: the ingress's listening address, its secret, the stream id, and
    for a TLS server the CA to check it against (and the name its certificate carries, if not host)."""

    host: str
    port: int
    secret: str = field(repr=False)
    stream_id: str
    tls_ca_file: str | None = None
    tls_server_name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenStreamTarget:
        try:
            ca, name = d.get("tls_ca_file"), d.get("tls_server_name")
            target = cls(str(d["host"]), int(d["port"]), str(d["secret"]), str(d["stream_id"]),
                         None if ca is None else str(ca), None if name is None else str(name))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"token_stream must be {{host, port, secret, stream_id}}: {exc!r}") from exc
        if not 0 < target.port < 65536:
            raise ValueError(f"token_stream port {target.port} is out of range")
        return target


def encode_frame(obj: Any) -> bytes:
    """obj as one frame: its msgpack body behind a 4-byte big-endian length."""
    body = msgpack.packb(obj, use_bin_type=True)
    return len(body).to_bytes(_LEN, "big") + body


async def read_frame(reader: asyncio.StreamReader, limit: int) -> Any:
    """One frame's decoded body; ValueError when it is over `limit` bytes or not msgpack."""
    size = int.from_bytes(await reader.readexactly(_LEN), "big")
    if size > limit:
        raise ValueError(f"frame of {size} bytes is over the {limit}-byte limit")
    body = await reader.readexactly(size)
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on bad bytes
        raise ValueError(f"undecodable frame: {type(exc).__name__}") from exc
