"""The ingress's end of the direct token streams: a server that hands each output to its stream's queue.

Wire, target and security: decode_workers.token_stream.

Invariants:
- a connection with a wrong secret, an oversized frame (MAX_FRAME_BYTES) or a frame that is not
  a list of [stream_id, output] pairs is closed, and delivers nothing after the offending frame;
- outputs for a stream id the server does not hold (never opened, or closed: the request was
  cancelled) are dropped.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from typing import Any

from decode_workers.token_stream import (
    ACK,
    CONNECT_TIMEOUT_S,
    MAX_FRAME_BYTES,
    MAX_HELLO_BYTES,
    TokenStreamSecurity,
    TokenStreamTarget,
    read_frame,
)

log = logging.getLogger(__name__)


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
            hello = await asyncio.wait_for(read_frame(reader, MAX_HELLO_BYTES), CONNECT_TIMEOUT_S)
            if not isinstance(hello, str) or not hmac.compare_digest(hello.encode(), self.secret.encode()):
                raise PermissionError("wrong token stream secret")
            writer.write(ACK)
            while True:
                self._dispatch(await read_frame(reader, MAX_FRAME_BYTES))
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
