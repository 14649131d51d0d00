"""KV transfer: every transport round-trips bit-exactly, frees what it stages, and names each failure.

Ray: one module-scoped local Ray (skipped if a session-wide one is already up).
gRPC: also tested across two processes (the exporter is a subprocess).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator

import grpc
import msgpack
import pytest
import torch

from engine.kv_cache import DTYPES, KVLayout, PagedKVCache
from kvtransfer import (
    KVConnector,
    KVCorruptError,
    KVHandle,
    KVLayoutError,
    KVNotFoundError,
    KVTimeoutError,
    KVTransferConfig,
    KVTransferError,
    make_connector,
)

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")  # 1 KiB per block
LAYOUT_BF16 = dataclasses.replace(LAYOUT, dtype="bfloat16")
TRANSPORTS = ["local", "ray", "grpc"]


def make_blocks(layout: KVLayout, n: int, seed: int) -> torch.Tensor:
    """Known blocks (the gRPC subprocess snippet below builds the same ones)."""
    g = torch.Generator().manual_seed(seed)
    shape = (layout.num_layers, 2, n, layout.block_size, layout.num_kv_heads, layout.head_dim)
    return torch.randn(shape, generator=g).to(DTYPES[layout.dtype])


def export(conn: KVConnector, blocks: torch.Tensor, layout: KVLayout = LAYOUT, request_id: str = "req") -> KVHandle:
    n = blocks.shape[2]
    hashes = [bytes([i % 256]) * 32 for i in range(n - 1)]  # last block partial: no hash
    return conn.export(request_id, blocks, layout, first_block=3, num_tokens=(n - 1) * layout.block_size + 1,
                       block_hashes=hashes)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():  # a session-wide fixture owns it
        yield
        return
    temp_dir = tempfile.mkdtemp(prefix="kvray-")  # short: Ray's socket paths must stay < 108 chars
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(params=TRANSPORTS)
def make(request: pytest.FixtureRequest) -> Iterator[Callable[..., KVConnector]]:
    """make(**config) -> a connector of the parametrised transport, closed after the test."""
    if request.param == "ray":
        request.getfixturevalue("ray_session")
    made: list[KVConnector] = []

    def _make(**kwargs: object) -> KVConnector:
        conn = make_connector(KVTransferConfig(transport=request.param, **kwargs))
        made.append(conn)
        return conn

    yield _make
    for conn in made:
        conn.close()
        assert conn.num_exports == 0 and conn.bytes_staged == 0


@pytest.mark.parametrize("layout", [LAYOUT, LAYOUT_BF16], ids=["float32", "bfloat16"])
def test_round_trip_is_bit_exact(make: Callable[..., KVConnector], layout: KVLayout) -> None:
    exporter, importer = make(lease_s=5.0), make()
    blocks = make_blocks(layout, 3, seed=0)
    before = time.time()
    handle = export(exporter, blocks, layout)

    assert (handle.request_id, handle.transport, handle.dtype) == ("req", exporter.transport, layout.dtype)
    assert handle.layout == layout.to_dict() and handle.shape == tuple(blocks.shape)
    assert (handle.first_block, handle.num_tokens) == (3, 2 * layout.block_size + 1)
    assert handle.block_hashes == (b"\x00" * 32, b"\x01" * 32)
    assert handle.nbytes == 3 * layout.bytes_per_block
    assert handle.checksum == zlib.crc32(blocks.reshape(-1).view(torch.uint8).numpy())
    assert before + 5.0 <= handle.lease_expires_at <= time.time() + 5.0
    assert handle.locator.endswith(handle.export_id)
    assert (handle.object_ref is not None) == (exporter.transport == "ray")
    assert exporter.num_exports == 1 and exporter.bytes_staged == handle.nbytes

    out = importer.fetch(handle, layout)
    assert same_bytes(out, blocks)
    cache = PagedKVCache(layout, num_blocks=8)
    cache.write_blocks([5, 0, 7], out)  # how the engine consumes it: index_copy_, no warning
    assert same_bytes(cache.read_blocks([5, 0, 7]), blocks)

    stats = importer.stats
    assert (stats.fetches, stats.bytes_fetched, stats.failures) == (1, handle.nbytes, 0)
    assert stats.fetch_seconds_total > 0
    assert (exporter.stats.exports, exporter.stats.bytes_exported) == (1, handle.nbytes)
    if exporter.transport == "ray":  # the exporter cannot see a remote ray.get: the importer's side releases
        assert exporter.num_exports == 1
        assert exporter.release(handle.export_id)
    assert exporter.num_exports == 0 and exporter.bytes_staged == 0  # local and grpc: freed when fetched
    assert exporter.stats.released == 1


def test_release_frees_staging(make: Callable[..., KVConnector]) -> None:
    exporter, importer = make(), make()
    first, second = export(exporter, make_blocks(LAYOUT, 2, 1)), export(exporter, make_blocks(LAYOUT, 1, 2))
    assert exporter.num_exports == 2 and exporter.bytes_staged == first.nbytes + second.nbytes
    assert exporter.release(first.export_id) is True
    assert exporter.release(first.export_id) is False  # idempotent
    assert exporter.num_exports == 1 and exporter.bytes_staged == second.nbytes
    with pytest.raises(KVNotFoundError):
        importer.fetch(first, LAYOUT)
    assert importer.stats.failures == 1
    assert same_bytes(importer.fetch(second, LAYOUT), make_blocks(LAYOUT, 1, 2))


def test_lease_expiry_frees_unfetched_exports(make: Callable[..., KVConnector]) -> None:
    exporter, importer = make(lease_s=0.2), make()
    handle = export(exporter, make_blocks(LAYOUT, 2, 3))
    assert exporter.reap_expired(now=time.time()) == 0
    assert exporter.reap_expired(now=handle.lease_expires_at + 0.01) == 1
    assert exporter.num_exports == 0 and exporter.bytes_staged == 0 and exporter.stats.expired == 1
    with pytest.raises(KVNotFoundError):
        importer.fetch(handle, LAYOUT)

    # Lazily, too: export() reaps what expired before it.
    stale = export(exporter, make_blocks(LAYOUT, 1, 4))
    time.sleep(0.25)
    export(exporter, make_blocks(LAYOUT, 1, 5))
    assert exporter.num_exports == 1 and exporter.stats.expired == 2
    with pytest.raises(KVNotFoundError):
        importer.fetch(stale, LAYOUT)


@pytest.mark.parametrize("fault, error", [
    ("corrupt", KVCorruptError),
    ("truncate", KVCorruptError),
    ("wrong_layout", KVLayoutError),
    ("timeout", KVTimeoutError),
])
def test_injected_faults_are_caught_by_the_importer(make: Callable[..., KVConnector], fault: str,
                                                    error: type[KVTransferError]) -> None:
    exporter, importer = make(fault=fault), make(timeout_s=0.3)
    blocks = make_blocks(LAYOUT, 2, 6)
    pristine = blocks.clone()
    handle = export(exporter, blocks)
    start = time.perf_counter()
    with pytest.raises(error):
        importer.fetch(handle, LAYOUT)
    assert time.perf_counter() - start < 5.0
    assert importer.stats.failures == 1 and importer.stats.fetches == 0
    assert same_bytes(blocks, pristine)  # faults change what is served, never the caller's tensor


def test_layout_mismatch_with_the_importer_is_rejected(make: Callable[..., KVConnector]) -> None:
    exporter, importer = make(), make()
    handle = export(exporter, make_blocks(LAYOUT, 2, 7))
    for expected in (dataclasses.replace(LAYOUT, block_size=8), dataclasses.replace(LAYOUT, num_kv_heads=1),
                     LAYOUT_BF16):
        with pytest.raises(KVLayoutError):
            importer.fetch(handle, expected)
    with pytest.raises(KVLayoutError):  # a handle whose shape disagrees with its own layout
        importer.fetch(dataclasses.replace(handle, shape=(2, 2, 2, 4, 2, 4)), LAYOUT)
    assert importer.stats.failures == 4
    assert same_bytes(importer.fetch(handle, LAYOUT), make_blocks(LAYOUT, 2, 7))


def test_export_rejects_blocks_that_do_not_fit() -> None:
    with make_connector(KVTransferConfig(transport="local")) as conn:
        blocks = make_blocks(LAYOUT, 2, 8)
        with pytest.raises(KVLayoutError):
            export(conn, blocks.to(torch.bfloat16))
        with pytest.raises(KVLayoutError):
            export(conn, blocks[:1])
        with pytest.raises(ValueError):
            export(conn, blocks.transpose(3, 4))
        with pytest.raises(ValueError):
            conn.export("r", blocks, LAYOUT, first_block=0, num_tokens=1, block_hashes=[])  # 2nd block empty
        with pytest.raises(KVTransferError):
            make_connector(KVTransferConfig(transport="local", max_payload_bytes=1024)).export(
                "r", blocks, LAYOUT, first_block=0, num_tokens=8, block_hashes=[])
        handle = export(conn, blocks)
        with make_connector(KVTransferConfig(transport="grpc")) as other, pytest.raises(KVTransferError):
            other.fetch(handle, LAYOUT)  # a handle of another transport
        assert conn.num_exports == 1
    assert conn.num_exports == 0


# ---- gRPC specifics -------------------------------------------------------------------------------------

def test_grpc_on_every_interface_advertises_a_dialable_address() -> None:
    """A server bound to 0.0.0.0 must put an address other nodes can dial in its locators: the node's IP
    (workers pass Ray's), never the wildcard, and it refuses to export with nothing to advertise."""
    blocks = make_blocks(LAYOUT, 2, 9)
    anywhere = {"transport": "grpc", "grpc_host": "0.0.0.0", "allow_plaintext": True}
    with make_connector(KVTransferConfig(**anywhere)) as nowhere, \
            pytest.raises(KVTransferError, match="grpc_advertise_host"):
        export(nowhere, blocks)
    wildcard = KVTransferConfig(**anywhere).for_node("127.0.0.1")
    assert wildcard.grpc_advertise_host == "127.0.0.1"
    assert KVTransferConfig(transport="grpc").for_node("10.1.2.3").advertised_host == "127.0.0.1"  # bound: kept
    with make_connector(wildcard) as exporter, make_connector(KVTransferConfig(transport="grpc")) as importer:
        handle = export(exporter, blocks)
        assert handle.locator.startswith("127.0.0.1:")
        assert same_bytes(importer.fetch(handle, LAYOUT), blocks)

def test_grpc_rejects_oversized_frames_and_payloads() -> None:
    with make_connector(KVTransferConfig(transport="grpc", chunk_bytes=1 << 20)) as exporter, \
            make_connector(KVTransferConfig(transport="grpc", chunk_bytes=1 << 10)) as small_frames, \
            make_connector(KVTransferConfig(transport="grpc", max_payload_bytes=1 << 10)) as small_payloads:
        big = make_blocks(LAYOUT, 400, 9)  # 400 KiB in one frame > 1 KiB + FRAME_SLACK
        handle = export(exporter, big)
        with pytest.raises(KVTransferError, match="max_payload_bytes"):
            small_payloads.fetch(handle, LAYOUT)
        with pytest.raises(KVCorruptError):
            small_frames.fetch(handle, LAYOUT)
        # Whether the server counts it as streamed in full (and frees it) depends on timing: the rejected
        # frame may already have left. Either way close() must leave nothing staged (checked below).
    assert exporter.num_exports == 0 and exporter.bytes_staged == 0


_EXPORTER_SNIPPET = """
import dataclasses, json, sys, torch
from engine.kv_cache import KVLayout
from kvtransfer import KVTransferConfig, make_connector
layout = KVLayout(**json.loads(sys.argv[1]))
conn = make_connector(KVTransferConfig(transport="grpc", chunk_bytes=4096))
out = []
for seed in (11, 12):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randn((layout.num_layers, 2, 5, layout.block_size, layout.num_kv_heads, layout.head_dim),
                         generator=g)
    h = conn.export(f"req{seed}", blocks, layout, first_block=0, num_tokens=17, block_hashes=[b"h" * 32] * 4)
    d = dataclasses.asdict(h)
    d.pop("object_ref")
    d["block_hashes"] = [x.hex() for x in h.block_hashes]
    out.append(d)
print(json.dumps(out), flush=True)
sys.stdin.read()  # serve until the test closes stdin
conn.close()
"""


def _handle_from_json(d: dict) -> KVHandle:
    return KVHandle(**{**d, "shape": tuple(d["shape"]), "block_hashes": tuple(bytes.fromhex(x) for x in
                                                                              d["block_hashes"])})


def test_grpc_between_two_processes_survives_malformed_requests() -> None:
    from kvtransfer.grpc_transport import METHOD

    proc = subprocess.Popen([sys.executable, "-c", _EXPORTER_SNIPPET, json.dumps(LAYOUT.to_dict())],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        first, second = (_handle_from_json(d) for d in json.loads(line))
        with make_connector(KVTransferConfig(transport="grpc", chunk_bytes=4096, timeout_s=5.0)) as importer:
            assert same_bytes(importer.fetch(first, LAYOUT), make_blocks(LAYOUT, 5, 11))
            with pytest.raises(KVNotFoundError):  # freed when fetched
                importer.fetch(first, LAYOUT)

            address = second.locator.rpartition("/")[0]
            with grpc.insecure_channel(address) as channel:
                fetch = channel.unary_stream(METHOD)
                for bad in (b"\xc1\xff garbage", msgpack.packb({"export_id": 5}), msgpack.packb([1, 2]),
                            msgpack.packb({"export_id": second.export_id, "pickle": b"x"})):
                    with pytest.raises(grpc.RpcError) as info:
                        list(fetch(bad, timeout=5.0))
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert same_bytes(importer.fetch(second, LAYOUT), make_blocks(LAYOUT, 5, 12))
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0


# ---- Ray specifics --------------------------------------------------------------------------------------

def _fetch_elsewhere(handle: KVHandle, layout: dict) -> tuple[str, torch.Tensor | None]:
    conn = make_connector(KVTransferConfig(transport="ray", timeout_s=5.0))
    try:
        return "ok", conn.fetch(handle, KVLayout(**layout)).clone()
    except KVTransferError as e:
        return type(e).__name__, None
    finally:
        conn.close()


def test_ray_fetch_from_another_process(ray_session: None) -> None:
    import ray

    fetch_elsewhere = ray.remote(num_cpus=0)(_fetch_elsewhere)
    with make_connector(KVTransferConfig(transport="ray", lease_s=60.0)) as exporter, \
            make_connector(KVTransferConfig(transport="ray", lease_s=0.3)) as short_lease:
        blocks = make_blocks(LAYOUT_BF16, 4, 13)
        handle = export(exporter, blocks, LAYOUT_BF16)
        stale = export(short_lease, blocks, LAYOUT_BF16)
        status, out = ray.get(fetch_elsewhere.remote(handle, LAYOUT_BF16.to_dict()), timeout=60)
        assert status == "ok" and same_bytes(out, blocks)
        time.sleep(max(0.0, stale.lease_expires_at - time.time()))
        status, _ = ray.get(fetch_elsewhere.remote(stale, LAYOUT_BF16.to_dict()), timeout=60)
        assert status == "KVNotFoundError"  # the importer honours the lease even while it holds the ref
