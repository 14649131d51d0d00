"""gRPC KV transport security: TLS, a shared token, and where each is configured.

Certificates are made here with `cryptography` (a self-signed CA per test
module, EC P-256, valid for 127.0.0.1 and localhost), so no files ship with the
tests. Every refusal is checked for what it must not do: serve bytes or consume
the export (it is still staged and fetchable by a rightful importer afterwards).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import msgpack
import pydantic
import pytest
from cryptography import x509

from cluster.products import ProductConfig
from kvtransfer import KVAuthError, KVConnector, KVNotFoundError, KVTransferConfig, KVTransferError, make_connector
from kvtransfer.grpc_frames import FetchRequest
from kvtransfer.grpc_transport import METHOD
from tests.test_kvtransfer import LAYOUT, export, make_blocks, same_bytes
from tests.tls_helpers import TLSFiles, loopback_names, write_self_signed

TOKEN = "kv-shared-token-0123456789abcdef"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return write_self_signed(tmp_path_factory.mktemp("tls"), "pdserve-kv-test", loopback_names())


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A certificate for the same addresses, signed by a CA the exporter's clients do not trust."""
    return write_self_signed(tmp_path_factory.mktemp("other-ca"), "someone-else", loopback_names())


@pytest.fixture
def make() -> Iterator[Callable[..., KVConnector]]:
    """make(**config) -> a gRPC connector, closed after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda **kwargs: stack.enter_context(
            make_connector(KVTransferConfig(transport="grpc", timeout_s=5.0, **kwargs)))


def _assert_still_staged(exporter: KVConnector, nbytes: int) -> None:
    assert exporter.num_exports == 1 and exporter.bytes_staged == nbytes
    assert exporter.stats.released == 0 and exporter.stats.expired == 0


# ---- TLS ------------------------------------------------------------------------------------------------

def test_tls_round_trip_is_bit_exact(make: Callable[..., KVConnector], tls: TLSFiles) -> None:
    exporter, importer = make(**tls.config(auth_token=TOKEN)), make(**tls.config(auth_token=TOKEN))
    blocks = make_blocks(LAYOUT, 3, seed=21)
    handle = export(exporter, blocks)
    assert same_bytes(importer.fetch(handle, LAYOUT), blocks)
    assert exporter.num_exports == 0 and exporter.stats.released == 1  # freed when fetched, as without TLS


def test_tls_server_name_override(make: Callable[..., KVConnector], tmp_path: Path) -> None:
    """The certificate names a service, the locator holds an IP: tls_server_name bridges the two."""
    named = write_self_signed(tmp_path / "named", "kv", [x509.DNSName("kv.pdserve.internal")])
    exporter = make(**named.config())
    handle = export(exporter, make_blocks(LAYOUT, 1, seed=22))
    with pytest.raises(KVTransferError):  # 127.0.0.1 is not a name in the certificate
        make(**named.config()).fetch(handle, LAYOUT)
    _assert_still_staged(exporter, handle.nbytes)
    out = make(**named.config(tls_server_name="kv.pdserve.internal")).fetch(handle, LAYOUT)
    assert same_bytes(out, make_blocks(LAYOUT, 1, seed=22))


def test_plaintext_client_is_refused_by_a_tls_server(make: Callable[..., KVConnector], tls: TLSFiles) -> None:
    exporter = make(**tls.config())
    blocks = make_blocks(LAYOUT, 2, seed=23)
    handle = export(exporter, blocks)
    plaintext = make()
    with pytest.raises(KVTransferError):
        plaintext.fetch(handle, LAYOUT)
    assert plaintext.stats.failures == 1 and plaintext.stats.fetches == 0

    address = handle.locator.rpartition("/")[0]
    with grpc.insecure_channel(address) as channel:  # a raw client: no handshake, so no RPC at all
        with pytest.raises(grpc.RpcError) as info:
            list(channel.unary_stream(METHOD)(FetchRequest(handle.export_id).encode(), timeout=5.0))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    _assert_still_staged(exporter, handle.nbytes)
    assert same_bytes(make(**tls.config()).fetch(handle, LAYOUT), blocks)


def test_tls_client_refuses_a_server_its_ca_did_not_sign(make: Callable[..., KVConnector], tls: TLSFiles,
                                                        other_ca: TLSFiles) -> None:
    """An importer does not hand its token to an impostor exporter: the handshake fails first."""
    impostor = make(**other_ca.config(auth_token=TOKEN))
    handle = export(impostor, make_blocks(LAYOUT, 1, seed=24))
    with pytest.raises(KVTransferError):
        make(**tls.config(auth_token=TOKEN)).fetch(handle, LAYOUT)
    _assert_still_staged(impostor, handle.nbytes)


def test_tls_client_cannot_talk_to_a_plaintext_server(make: Callable[..., KVConnector], tls: TLSFiles) -> None:
    exporter = make()
    handle = export(exporter, make_blocks(LAYOUT, 1, seed=25))
    with pytest.raises(KVTransferError):
        make(**tls.config()).fetch(handle, LAYOUT)
    _assert_still_staged(exporter, handle.nbytes)


def test_unreadable_tls_files_fail_loudly(make: Callable[..., KVConnector], tls: TLSFiles, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(KVTransferError, match="missing.pem"):
        _ = make(**{**tls.config(), "tls_key_file": missing}).address  # the server starts on first use
    exporter = make(**tls.config())
    handle = export(exporter, make_blocks(LAYOUT, 1, seed=26))
    with pytest.raises(KVTransferError, match="missing.pem"):
        make(**{**tls.config(), "tls_ca_file": missing}).fetch(handle, LAYOUT)
    _assert_still_staged(exporter, handle.nbytes)


# ---- the shared token -----------------------------------------------------------------------------------

def test_wrong_or_missing_token_is_refused_and_consumes_nothing(make: Callable[..., KVConnector]) -> None:
    exporter = make(auth_token=TOKEN)
    blocks = make_blocks(LAYOUT, 2, seed=27)
    handle = export(exporter, blocks)
    for importer in (make(), make(auth_token="x" * len(TOKEN)), make(auth_token=TOKEN + "0")):
        with pytest.raises(KVAuthError, match="refused"):
            importer.fetch(handle, LAYOUT)
        assert importer.stats.failures == 1
    _assert_still_staged(exporter, handle.nbytes)

    address = handle.locator.rpartition("/")[0]
    good = ("authorization", f"Bearer {TOKEN}")
    with grpc.insecure_channel(address) as channel:
        fetch = channel.unary_stream(METHOD)
        for request, metadata in (
            (FetchRequest(handle.export_id).encode(), (("authorization", TOKEN),)),  # no "Bearer "
            (FetchRequest(handle.export_id).encode(), (good, ("authorization", "Bearer wrong"))),  # two values
            (FetchRequest(handle.export_id, token=TOKEN).encode(), ()),  # the frame's token field is no credential
            (b"\xc1 not msgpack", ()),  # the token is checked before the request is even parsed
            (msgpack.packb({"export_id": "no-such-export"}), ()),  # ... or the export looked up
        ):
            with pytest.raises(grpc.RpcError) as info:
                list(fetch(request, metadata=metadata, timeout=5.0))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        with pytest.raises(grpc.RpcError) as info:  # with the token, a bad frame is the caller's next problem
            list(fetch(b"\xc1 not msgpack", metadata=(good,), timeout=5.0))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _assert_still_staged(exporter, handle.nbytes)

    assert same_bytes(make(auth_token=TOKEN).fetch(handle, LAYOUT), blocks)
    assert exporter.num_exports == 0


def test_a_fetch_without_the_exports_own_token_gets_nothing(make: Callable[..., KVConnector]) -> None:
    """Without a shared token, each export still has its own: a caller who knows only the locator (say,
    from a log) is answered exactly as for a missing export, and the export stays for its importer."""
    exporter = make()
    blocks = make_blocks(LAYOUT, 2, seed=30)
    handle = export(exporter, blocks)
    assert handle.fetch_token and handle.fetch_token not in repr(handle)
    address = handle.locator.rpartition("/")[0]
    with grpc.insecure_channel(address) as channel:
        fetch = channel.unary_stream(METHOD)
        for token in (None, "", "wrong", handle.fetch_token[:-1]):
            with pytest.raises(grpc.RpcError) as info:
                list(fetch(FetchRequest(handle.export_id, token).encode(), timeout=5.0))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND, token
    forged = dataclasses.replace(handle, fetch_token="x" * 32)
    with pytest.raises(KVNotFoundError):
        make().fetch(forged, LAYOUT)
    _assert_still_staged(exporter, handle.nbytes)
    assert same_bytes(make().fetch(handle, LAYOUT), blocks)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "kv.internal"])
def test_plaintext_beyond_loopback_is_refused_unless_allowed(host: str, tls: TLSFiles) -> None:
    with pytest.raises(ValueError, match="plaintext"):
        KVTransferConfig(transport="grpc", grpc_host=host)
    assert KVTransferConfig(transport="grpc", grpc_host=host, allow_plaintext=True).grpc_host == host
    assert KVTransferConfig(transport="grpc", grpc_host=host, **tls.config()).tls
    with pytest.raises(pydantic.ValidationError, match="plaintext"):  # a product file says so at load
        ProductConfig(name="p", transfer={"transport": "grpc", "grpc_host": host})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"])
def test_plaintext_on_loopback_needs_no_setting(host: str) -> None:
    assert KVTransferConfig(transport="grpc", grpc_host=host).grpc_host == host


def test_token_is_compared_in_constant_time(make: Callable[..., KVConnector],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import kvtransfer.grpc_transport as transport

    calls: list[tuple[bytes, bytes]] = []
    real = transport.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(transport.hmac, "compare_digest", spy)
    exporter = make(auth_token=TOKEN)
    handle = export(exporter, make_blocks(LAYOUT, 1, seed=28))
    with pytest.raises(KVAuthError):
        make(auth_token="y" * 20).fetch(handle, LAYOUT)
    make(auth_token=TOKEN).fetch(handle, LAYOUT)
    shared = [call for call in calls if call[1].startswith(b"Bearer ")]  # the rest: per-export tokens
    assert shared == [(b"Bearer " + b"y" * 20, f"Bearer {TOKEN}".encode()),
                      (f"Bearer {TOKEN}".encode(), f"Bearer {TOKEN}".encode())]
    assert len(calls) == len(shared) + 1  # one per-export check, for the fetch that got through


def test_token_from_an_environment_variable(make: Callable[..., KVConnector], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PDSERVE_TEST_KV_TOKEN", raising=False)
    config = KVTransferConfig(transport="grpc", auth_token_env="PDSERVE_TEST_KV_TOKEN")  # valid without the secret
    with pytest.raises(ValueError, match="PDSERVE_TEST_KV_TOKEN"):  # a worker without it must not run open
        make_connector(config)
    monkeypatch.setenv("PDSERVE_TEST_KV_TOKEN", TOKEN)
    exporter = make(auth_token_env="PDSERVE_TEST_KV_TOKEN")
    handle = export(exporter, make_blocks(LAYOUT, 1, seed=29))
    with pytest.raises(KVAuthError):
        make().fetch(handle, LAYOUT)
    assert same_bytes(make(auth_token=TOKEN).fetch(handle, LAYOUT), make_blocks(LAYOUT, 1, seed=29))


@pytest.mark.parametrize("fields, message", [
    ({"tls_cert_file": "c.pem"}, "all three"),
    ({"tls_cert_file": "c.pem", "tls_key_file": "k.pem"}, "all three"),
    ({"tls_server_name": "kv"}, "needs TLS"),
    ({"auth_token": TOKEN, "auth_token_env": "X"}, "not both"),
    ({"auth_token": "short"}, ">= 16"),
    ({"auth_token": "a token with a\nnewline"}, "printable"),
    ({"auth_token": TOKEN, "transport": "ray"}, "grpc transport only"),
    ({"tls_cert_file": "c", "tls_key_file": "k", "tls_ca_file": "a", "transport": "local"}, "grpc transport only"),
])
def test_security_config_is_validated(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KVTransferConfig(**{"transport": "grpc", **fields})


def test_token_stays_out_of_reprs() -> None:
    assert TOKEN not in repr(KVTransferConfig(transport="grpc", auth_token=TOKEN))


# ---- per-deployment configuration (product files) -------------------------------------------------------

def test_products_take_tls_and_a_token_variable_but_never_the_token(tls: TLSFiles) -> None:
    transfer = {"transport": "grpc", "auth_token_env": "PDSERVE_KV_TOKEN", **tls.config()}
    config = ProductConfig(name="p", transfer=transfer).transfer_config()
    assert (config.auth_token_env, config.auth_token, config.tls) == ("PDSERVE_KV_TOKEN", None, True)
    with pytest.raises(pydantic.ValidationError, match="auth_token_env"):
        ProductConfig(name="p", transfer={"transport": "grpc", "auth_token": TOKEN})
    with pytest.raises(pydantic.ValidationError, match="all three"):
        ProductConfig(name="p", transfer={"transport": "grpc", "tls_cert_file": tls.cert})
