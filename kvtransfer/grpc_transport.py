"""GrpcConnector: KV blocks streamed over gRPC with msgpack framing (between clusters, or without an object store).

Exporting side: a grpcio server (started on first export or first read of
.address) bound to config.grpc_host:config.grpc_port (0 = ephemeral; locators
name config.advertised_host, the address other nodes dial) serves
one unary-stream method, /pdserve.kvtransfer.KVTransfer/Fetch, through a
generic handler with bytes in and out (no .proto). The staged payload is a
reference to the exported bytes (no copy). An export is freed once streamed in
full ("freed when fetched"); a stream the client abandons leaves it staged for
a retry until release or lease expiry.

Wire format and its bounds: kvtransfer.grpc_frames. The server caps what it sends, and the
client what it accepts, at chunk_bytes + FRAME_SLACK bytes a frame (gRPC's max message length).

Importing side: one channel per address, made lazily and cached until
close(); the whole stream must finish within config.timeout_s (a gRPC deadline).
handle.locator is "host:port/export_id".

Fault "timeout": the server sends the header, then stalls the stream (sends
nothing) until the client's deadline cancels the call, the lease ends, or the
connector closes.

Security (config.tls_*, config.auth_token / auth_token_env):
- TLS: the server listens with grpc.ssl_server_credentials (cert + key), the
  client dials with grpc.ssl_channel_credentials trusting only tls_ca_file, so a
  plaintext peer cannot even complete the handshake. Without TLS files: plaintext.
- Shared token: the client sends "authorization: Bearer <token>" call metadata
  with every fetch; the server compares it in constant time (hmac.compare_digest)
  before it decodes the request or looks up the export, and answers
  UNAUTHENTICATED otherwise: a caller without the token learns nothing, and no
  export is served or consumed. The importer maps that to KVAuthError.
- Per-export token, always on: each export gets a random secret (KVHandle.fetch_token) that the
  importer sends as FetchRequest.token; a fetch without it is answered NOT_FOUND, exactly as for
  an export that does not exist, so a caller who only knows a locator learns nothing and consumes
  nothing. The handle reaches the importer inside Ray's own authenticated calls.
- Plaintext only on loopback unless config.allow_plaintext (KVTransferConfig refuses otherwise).
- Nothing from the network is unpickled (kvtransfer.grpc_frames decodes every frame).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import grpc
import numpy as np

from kvtransfer.config import KVTransferConfig
from kvtransfer.connector import KVConnector
from kvtransfer.errors import KVAuthError, KVCorruptError, KVNotFoundError, KVTimeoutError, KVTransferError
from kvtransfer.grpc_frames import (
    FRAME_SLACK,
    REQUEST_MAX_BYTES,
    DataFrame,
    EndFrame,
    FetchRequest,
    HeaderFrame,
    decode_frame,
)
from kvtransfer.handle import KVHandle

SERVICE = "pdserve.kvtransfer.KVTransfer"
METHOD = f"/{SERVICE}/Fetch"
AUTH_METADATA_KEY = "authorization"  # gRPC metadata keys are lower case
_SERVER_THREADS = 8


@dataclass(frozen=True)
class _GrpcPayload:
    header: bytes  # encoded once at export
    data: np.ndarray  # uint8 view of the exported bytes (or the faulty ones)
    fetch_token: str  # the export's own secret; a fetch must present it

    def admits(self, token: str | None) -> bool:
        """True iff `token` is this export's (constant time, as the shared token)."""
        return token is not None and hmac.compare_digest(token.encode(), self.fetch_token.encode())


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _read_pem(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise KVTransferError(f"cannot read TLS file {path}: {e}") from e


def _bearer(token: str) -> str:
    return f"Bearer {token}"


def _has_token(context: grpc.ServicerContext, expected: bytes) -> bool:
    """True iff the call carries exactly one authorization value equal to `expected`.

    hmac.compare_digest takes time independent of where the values differ (it reveals only
    whether the lengths differ), so response timing does not leak the token byte by byte.
    """
    sent = [v for k, v in context.invocation_metadata() or () if k == AUTH_METADATA_KEY]
    if len(sent) != 1:
        return False
    value = sent[0].encode() if isinstance(sent[0], str) else sent[0]
    return hmac.compare_digest(value, expected)


class GrpcConnector(KVConnector):
    """gRPC streaming transport. Both sides use the same class; the server starts only when needed."""

    transport = "grpc"

    def __init__(self, config: KVTransferConfig) -> None:
        """Raises ValueError if the configured token is unset (auth_token_env) or weak."""
        super().__init__(config)
        token = config.resolved_token()
        self._call_metadata: tuple[tuple[str, str], ...] = ((AUTH_METADATA_KEY, _bearer(token)),) if token else ()
        self._expected_auth: bytes | None = _bearer(token).encode() if token else None
        self._frame_limit = config.chunk_bytes + FRAME_SLACK
        self._server: grpc.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._address: str | None = None
        self._server_lock = threading.Lock()
        self._closing = threading.Event()
        self._channels: dict[str, tuple[grpc.Channel, Any]] = {}
        self._channels_lock = threading.Lock()

    @property
    def address(self) -> str:
        """"host:port" the server listens on; starts the server if it is not running yet."""
        return self._ensure_server()

    # ---- exporting side -------------------------------------------------------------------------------

    def _ensure_server(self) -> str:
        with self._server_lock:
            if self._address is not None:
                return self._address
            if self._closing.is_set():
                raise KVTransferError("connector is closed")
            credentials = self._server_credentials()  # before any resource: a bad PEM path leaks nothing
            try:
                advertised = self.config.advertised_host
            except ValueError as e:
                raise KVTransferError(str(e)) from e
            executor = ThreadPoolExecutor(max_workers=_SERVER_THREADS, thread_name_prefix="kv-grpc")
            server = grpc.server(executor, maximum_concurrent_rpcs=4 * _SERVER_THREADS, options=[
                ("grpc.max_send_message_length", self._frame_limit),
                ("grpc.max_receive_message_length", REQUEST_MAX_BYTES),
                ("grpc.so_reuseport", 0),  # a taken fixed port must fail, not be shared silently
            ])
            handler = grpc.unary_stream_rpc_method_handler(self._serve_fetch)  # no (de)serializers: bytes
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Fetch": handler}),))
            try:
                address = _join(self.config.grpc_host, self.config.grpc_port)
                port = (server.add_secure_port(address, credentials) if credentials is not None
                        else server.add_insecure_port(address))
            except RuntimeError as e:
                executor.shutdown(wait=False)
                raise KVTransferError(f"cannot bind {self.config.grpc_host}:{self.config.grpc_port}: {e}") from e
            server.start()
            self._server, self._executor = server, executor
            self._address = _join(advertised, port)
            return self._address

    def _server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials from the configured PEM files, or None for plaintext. Raises KVTransferError."""
        if not self.config.tls:
            return None
        return grpc.ssl_server_credentials([(_read_pem(self.config.tls_key_file),
                                             _read_pem(self.config.tls_cert_file))])

    def _stage(self, handle: KVHandle, payload: np.ndarray) -> tuple[KVHandle, _GrpcPayload]:
        header = HeaderFrame.from_handle(handle).encode()
        if len(header) > self._frame_limit:
            raise KVTransferError(f"header of {len(header)} bytes ({len(handle.block_hashes)} hashes) exceeds the "
                                  f"frame limit {self._frame_limit}")
        locator = f"{self._ensure_server()}/{handle.export_id}"
        token = secrets.token_urlsafe(24)
        return replace(handle, locator=locator, fetch_token=token), _GrpcPayload(header, payload, token)

    def _serve_fetch(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Runs on a server thread. Errors end the RPC with a status; the server keeps serving.

        The token is checked first: an unauthenticated call learns nothing, not even whether its
        request frame parses or its export exists, and consumes nothing.
        """
        if self._expected_auth is not None and not _has_token(context, self._expected_auth):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong KV transfer token")
        try:
            req = FetchRequest.decode(request)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad request frame: {e}")
        entry = self._lookup(req.export_id)
        if entry is None or not entry.stored.admits(req.token):
            context.abort(grpc.StatusCode.NOT_FOUND, f"export {req.export_id}: unknown, released or expired")
        payload: _GrpcPayload = entry.stored
        yield payload.header
        if self.config.fault == "timeout":
            while context.is_active() and not self._closing.is_set() and time.time() < entry.expires_at:
                self._closing.wait(0.05)
            return
        chunk = self.config.chunk_bytes
        data = payload.data
        seq = 0
        for offset in range(0, data.size, chunk):
            if not context.is_active():
                return  # client gone: keep the export for a retry until release or lease expiry
            yield DataFrame.encode_chunk(seq, memoryview(data[offset:offset + chunk]))
            seq += 1
        yield EndFrame(seq, int(data.size)).encode()
        # Runs when gRPC asks for the next frame, before it sends the OK status.
        self._free(req.export_id)

    # ---- importing side -------------------------------------------------------------------------------

    def _stub(self, address: str) -> Any:
        with self._channels_lock:
            if address not in self._channels:
                channel = self._open_channel(address)
                self._channels[address] = (channel, channel.unary_stream(METHOD))
            return self._channels[address][1]

    def _open_channel(self, address: str) -> grpc.Channel:
        options = [
            ("grpc.max_receive_message_length", self._frame_limit),
            ("grpc.max_send_message_length", REQUEST_MAX_BYTES),
        ]
        if not self.config.tls:
            return grpc.insecure_channel(address, options=options)
        if self.config.tls_server_name is not None:
            options.append(("grpc.ssl_target_name_override", self.config.tls_server_name))
        credentials = grpc.ssl_channel_credentials(root_certificates=_read_pem(self.config.tls_ca_file))
        return grpc.secure_channel(address, credentials, options=options)

    def _fetch_payload(self, handle: KVHandle) -> np.ndarray:
        address, _, export_id = handle.locator.rpartition("/")
        if not address or export_id != handle.export_id:
            raise KVNotFoundError(f"bad locator {handle.locator!r}")
        call = self._stub(address)(FetchRequest(export_id, handle.fetch_token).encode(), timeout=self.config.timeout_s,
                                   metadata=self._call_metadata)
        try:
            return self._read_stream(handle, call)
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise KVTimeoutError(f"export {export_id}: not received within {self.config.timeout_s} s") from e
            if code == grpc.StatusCode.NOT_FOUND:
                raise KVNotFoundError(f"export {export_id}: {details}") from e
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise KVAuthError(f"export {export_id}: refused by the exporter: {details}") from e
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise KVCorruptError(f"export {export_id}: frame over the limit: {details}") from e
            raise KVTransferError(f"export {export_id}: gRPC {code.name}: {details}") from e
        finally:
            call.cancel()  # no-op when the stream finished; stops the server otherwise

    def _read_stream(self, handle: KVHandle, call: Iterator[bytes]) -> np.ndarray:
        frames = iter(call)
        first = next(frames, None)
        header = decode_frame(first) if first is not None else None
        if not isinstance(header, HeaderFrame):
            raise KVCorruptError(f"export {handle.export_id}: stream does not start with a header")
        header.check_against(handle)
        buf = np.empty(handle.nbytes, dtype=np.uint8)
        received = seq = 0
        end: EndFrame | None = None
        for raw in frames:
            frame = decode_frame(raw)
            if end is not None or isinstance(frame, HeaderFrame):
                raise KVCorruptError(f"export {handle.export_id}: unexpected frame after header/end")
            if isinstance(frame, EndFrame):
                end = frame
                continue
            size = len(frame.data)
            if frame.seq != seq or size > self.config.chunk_bytes or received + size > handle.nbytes:
                raise KVCorruptError(f"export {handle.export_id}: bad data frame seq {frame.seq} of {size} bytes")
            buf[received:received + size] = np.frombuffer(frame.data, dtype=np.uint8)
            received += size
            seq += 1
        if end is None or end.frames != seq or end.nbytes != received:
            raise KVCorruptError(f"export {handle.export_id}: stream ended after {received} bytes without a "
                                 f"matching end frame")
        return buf[:received]  # shorter than nbytes if truncated: the size check reports it

    def _close(self) -> None:
        self._closing.set()  # ends stalled streams
        with self._server_lock:
            server, executor = self._server, self._executor
            self._server = self._executor = self._address = None
        if server is not None:
            server.stop(grace=1.0).wait()
        if executor is not None:
            executor.shutdown(wait=True)
        with self._channels_lock:
            channels = [c for c, _ in self._channels.values()]
            self._channels.clear()
        for channel in channels:
            channel.close()
