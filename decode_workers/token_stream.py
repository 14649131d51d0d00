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

Security (TokenStreamSecurity): every connection presents the secret; the outputs are the users'
answers, so plaintext stays on loopback. A server beyond loopback uses TLS (the target names the CA
the worker checks the ingress's certificate against) or is explicitly allowed plaintext; otherwise
the ingress does not open one and tokens travel inside Serve's calls, under Ray's own security.

Invariants:
- one stream's outputs travel over one connection, so they arrive in the order they were sent;
- a connection with a wrong secret, an oversized frame (MAX_FRAME_BYTES) or a frame that is not
  that list is closed, and delivers nothing after the offending frame;
- outputs for a stream id the server does not hold (never opened, or closed: the request was
  cancelled) are dropped;
- the sender's buffer is bounded: a stream waits (`send` awaits) when over HIGH_WATER_BYTES.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import secrets
import ssl
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as config_dataclass

from kvtransfer.config import is_loopback

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 8 << 20  # far above one frame of outputs (a step's tokens for every stream)
MAX_HELLO_BYTES = 1024
HIGH_WATER_BYTES = 1 << 20
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
        files = (self.tls_cert_file, self.tls_key_file, self.tls_ca_file)
        if any(f is not None for f in files) and not all(files):
            raise ValueError("token stream TLS: set tls_cert_file, tls_key_file and tls_ca_file together")
        if self.tls_server_name is not None and not self.tls:
            raise ValueError("token stream tls_server_name needs the TLS files")

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


@functools.lru_cache(maxsize=8)
def _client_context(ca_file: str) -> ssl.SSLContext:
    """A TLS client context that trusts only ca_file (read once per worker)."""
    return ssl.create_default_context(cafile=ca_file)


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


def _frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return len(body).to_bytes(_LEN, "big") + body


async def _read_frame(reader: asyncio.StreamReader, limit: int) -> Any:
    """One frame's decoded body; ValueError when it is over `limit` bytes or not msgpack."""
    size = int.from_bytes(await reader.readexactly(_LEN), "big")
    if size > limit:
        raise ValueError(f"frame of {size} bytes is over the {limit}-byte limit")
    body = await reader.readexactly(size)
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on bad bytes
        raise ValueError(f"undecodable frame: {type(exc).__name__}") from exc


# ---- the ingress's end -------------------------------------------------------------------------
class TokenStreamServer:
    """Listens for decode workers and hands each output to the queue of its stream id.

    Lives on one event loop (the ingress replica's); open/close/dispatch run there only.
    """

    def __init__(self, security: TokenStreamSecurity | None = None) -> None:
        self.security = security or TokenStreamSecurity()
        self.secret = secrets.token_hex(16)
        self._queues: dict[str, asyncio.Queue] = {}
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self.host = ""
        self.port = 0
        self.frames_received = 0  # for tests and metrics: how many frames carried the outputs

    async def start(self, host: str) -> None:
        """Listen on host (an ephemeral port). ValueError if the security settings forbid plaintext there;
        OSError (ssl.SSLError included) if the port or the TLS files cannot be used."""
        if not self.security.permits(host):
            raise ValueError(f"token streams on {host} would cross the network in plaintext: configure TLS "
                             "or allow_plaintext")
        context = self.security.server_context()
        self._server = await asyncio.start_server(self._serve, host, 0, ssl=context,
                                                  ssl_handshake_timeout=CONNECT_TIMEOUT_S if context else None)
        self.host, self.port = host, self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._connections):
                writer.close()
            await self._server.wait_closed()

    def target(self, stream_id: str) -> TokenStreamTarget:
        return TokenStreamTarget(self.host, self.port, self.secret, stream_id, self.security.tls_ca_file,
                                 self.security.tls_server_name)

    def open(self, stream_id: str) -> asyncio.Queue:
        """The queue that will receive stream_id's outputs (dicts), in order."""
        if stream_id in self._queues:
            raise ValueError(f"stream {stream_id!r} is already open")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[stream_id] = queue
        return queue

    def close(self, stream_id: str) -> None:
        """Stop receiving stream_id; anything still arriving for it is dropped."""
        self._queues.pop(stream_id, None)

    @property
    def num_open(self) -> int:
        return len(self._queues)

    def num_open_for(self, prefix: str) -> int:
        """Open streams whose id starts with prefix (the ingress names them "<product>/<id>")."""
        return sum(1 for stream_id in self._queues if stream_id.startswith(prefix))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        peer = writer.get_extra_info("peername")
        try:
            hello = await asyncio.wait_for(_read_frame(reader, MAX_HELLO_BYTES), CONNECT_TIMEOUT_S)
            if not isinstance(hello, str) or not hmac.compare_digest(hello.encode(), self.secret.encode()):
                raise PermissionError("wrong token stream secret")
            writer.write(ACK)
            while True:
                self._dispatch(await _read_frame(reader, MAX_FRAME_BYTES))
        except asyncio.IncompleteReadError:
            pass  # the worker closed the connection (its replica stopped): its requests' Serve calls say why
        except (ValueError, PermissionError, TimeoutError) as exc:
            log.warning("closing token stream connection from %s: %s", peer, exc)
        except ConnectionError:
            pass
        finally:
            self._connections.discard(writer)
            writer.close()

    def _dispatch(self, frame: Any) -> None:
        if not isinstance(frame, list) or not all(
                isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], dict)
                for item in frame):
            raise ValueError("a frame must be a list of [stream_id, output] pairs")
        self.frames_received += 1
        for stream_id, output in frame:
            queue = self._queues.get(stream_id)
            if queue is not None:
                queue.put_nowait(output)


# ---- the decode worker's end -------------------------------------------------------------------
class _Connection:
    """One open connection to one ingress; buffers sends of the current loop turn into one frame."""

    def __init__(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.name = name
        self._writer = writer
        self._pending: list[list[Any]] = []
        self._flush_scheduled = False
        self.error: TokenStreamError | None = None
        self._watcher = asyncio.ensure_future(self._watch(reader))

    @property
    def alive(self) -> bool:
        return self.error is None

    async def send(self, stream_id: str, output: dict[str, Any]) -> None:
        """Queue one output; it goes out with the rest of this loop turn's. Raises TokenStreamError once the
        connection is lost. Waits while the socket's buffer is over HIGH_WATER_BYTES (a slow ingress)."""
        self._check()
        self._pending.append([stream_id, output])
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        if self._writer.transport.get_write_buffer_size() > HIGH_WATER_BYTES:
            await self._drain()

    async def flush(self) -> None:
        """Write what is queued now and wait until the socket took it."""
        self._flush()
        await self._drain()

    def close(self) -> None:
        self._fail(TokenStreamError(f"token stream to {self.name} closed"))

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._pending and self.error is None:
            frame, self._pending = _frame(self._pending), []
            self._writer.write(frame)

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            self._fail(TokenStreamError(f"token stream to {self.name} lost: {exc!r}"))
        self._check()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    async def _watch(self, reader: asyncio.StreamReader) -> None:
        """The server never writes after its ACK: any read returning is the connection ending."""
        try:
            await reader.read(1)
        except ConnectionError:
            pass
        self._fail(TokenStreamError(f"token stream to {self.name} closed by the ingress"))

    def _fail(self, error: TokenStreamError) -> None:
        if self.error is None:
            self.error = error
            self._pending.clear()
            self._writer.close()
            if self._watcher is not asyncio.current_task():
                self._watcher.cancel()


class TokenStreamSender:
    """A decode worker's connections, one per ingress address, opened on first use and reused."""

    def __init__(self) -> None:
        self._connections: dict[tuple[str, int], _Connection] = {}
        self._connecting: dict[tuple[str, int], asyncio.Future] = {}

    async def connect(self, target: TokenStreamTarget) -> _Connection:
        """The live connection to target's ingress; TokenStreamError when it cannot be opened or refuses."""
        key = (target.host, target.port)
        conn = self._connections.get(key)
        if conn is not None and conn.alive:
            return conn
        pending = self._connecting.get(key)
        if pending is None:  # one connect per address at a time; concurrent requests share it
            pending = asyncio.ensure_future(self._open(target))
            self._connecting[key] = pending
            pending.add_done_callback(lambda _: self._connecting.pop(key, None))
        conn = await asyncio.shield(pending)
        self._connections[key] = conn
        return conn

    def close(self) -> None:
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()

    @staticmethod
    async def _open(target: TokenStreamTarget) -> _Connection:
        name = f"{target.host}:{target.port}"
        try:
            tls = {} if target.tls_ca_file is None else {
                "ssl": _client_context(target.tls_ca_file), "server_hostname": target.tls_server_name or target.host}
            reader, writer = await asyncio.wait_for(asyncio.open_connection(target.host, target.port, **tls),
                                                    CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError (a certificate not from the CA) is an OSError
            raise TokenStreamError(f"cannot connect the token stream to {name}: {exc!r}") from exc
        try:
            writer.write(_frame(target.secret))
            ack = await asyncio.wait_for(reader.read(1), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            writer.close()
            raise TokenStreamError(f"token stream to {name}: no answer to the handshake: {exc!r}") from exc
        if ack != ACK:
            writer.close()
            raise TokenStreamError(f"token stream to {name} refused (wrong secret?)")
        return _Connection(name, reader, writer)
