"""The decode worker's end of the direct token streams: one connection per ingress, one frame per loop turn.

Wire, target and security: decode_workers.token_stream.

Invariants:
- one stream's outputs travel over one connection, so they arrive in the order they were sent;
- the sender's buffer is bounded: a stream waits (`send` awaits) when over HIGH_WATER_BYTES.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from typing import Any

from decode_workers.token_stream import ACK, CONNECT_TIMEOUT_S, TokenStreamError, TokenStreamTarget, encode_frame

HIGH_WATER_BYTES = 1 << 20  # bytes waiting in a connection's socket buffer before send() waits for it


@functools.lru_cache(maxsize=8)
def _client_context(ca_file: str) -> ssl.SSLContext:
    """A TLS client context that trusts only ca_file (read once per worker)."""
    return ssl.create_default_context(cafile=ca_file)


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
            frame, self._pending = encode_frame(self._pending), []
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
            writer.write(encode_frame(target.secret))
            ack = await asyncio.wait_for(reader.read(1), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            writer.close()
            raise TokenStreamError(f"token stream to {name}: no answer to the handshake: {exc!r}") from exc
        if ack != ACK:
            writer.close()
            raise TokenStreamError(f"token stream to {name} refused (wrong secret?)")
        return _Connection(name, reader, writer)
