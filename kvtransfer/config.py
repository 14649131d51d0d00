"""How KV blocks travel between engines: transport choice, leases, limits."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import replace
from typing import Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

Transport = Literal["local", "ray", "grpc"]
Fault = Literal["corrupt", "truncate", "timeout", "wrong_layout"]
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", ""})  # bind every interface; never dialable


def check_tls_files(cert: str | None, key: str | None, ca: str | None, server_name: str | None, owner: str) -> None:
    """ValueError unless the TLS PEM files are all three or none, and a server name comes only with them."""
    files = (cert, key, ca)
    if any(f is not None for f in files) and not all(files):
        raise ValueError(f"{owner}: tls_cert_file, tls_key_file and tls_ca_file go together: set all three or none")
    if server_name is not None and cert is None:
        raise ValueError(f"{owner}: tls_server_name needs TLS (tls_cert_file, tls_key_file, tls_ca_file)")


def is_loopback(host: str) -> bool:
    """True if `host` names this machine only (127.0.0.0/8, ::1, localhost): nothing off the host can dial it."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a DNS name other than localhost may resolve anywhere


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class KVTransferConfig:
    """Units: seconds and bytes.

    lease_s: an export not fetched (or released) within this long is freed.
    fault: for tests and drills only; the exporting side injects this fault
    into what it serves, so the importer's checks are exercised for real.

    Security (gRPC transport only; the Ray transport relies on the Ray cluster's own auth):
    tls_cert_file / tls_key_file / tls_ca_file: PEM paths, all three or none. The
    server presents cert + key; the client trusts only certificates signed by the CA
    bundle. A connector is both server and client, so one config carries both sides.
    tls_server_name: the name the client checks in the server certificate when it
    differs from the host in the locator (pods dial IPs, certificates name services).
    auth_token / auth_token_env: a secret shared by every exporter and importer of a
    deployment (>= 16 printable ASCII characters), given directly (tests, programs) or
    as the name of an environment variable read when the connector is made (deploy
    configs: the secret never sits in a config file). Exporters refuse fetches
    without it; importers send it with every fetch.
    allow_plaintext: the gRPC server refuses to listen beyond loopback without TLS (KV blocks are the
    users' prompts); set this to accept plaintext across hosts on a network you trust.
    Every export also carries its own fetch token (KVHandle.fetch_token), shared or not.
    """

    transport: Transport = "ray"
    lease_s: float = Field(30.0, gt=0)
    timeout_s: float = Field(10.0, gt=0)
    chunk_bytes: int = Field(1 << 20, ge=1 << 10, le=64 << 20)  # [1 KiB, 64 MiB]
    max_payload_bytes: int = Field(4 << 30, gt=0)
    grpc_host: str = "127.0.0.1"  # the address the server binds; 0.0.0.0 or :: for every interface
    grpc_port: int = Field(0, ge=0, le=65535)  # 0: pick a free port
    # The host importers dial, written into every locator. None: grpc_host, unless that is a wildcard,
    # which no other node can dial: then workers fill in their node's IP (for_node).
    grpc_advertise_host: str | None = None
    fault: Fault | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_ca_file: str | None = None
    tls_server_name: str | None = None
    auth_token: str | None = Field(default=None, repr=False)  # a secret: kept out of logs and reprs
    auth_token_env: str | None = None
    allow_plaintext: bool = False

    @classmethod
    def coerce(cls, value: KVTransferConfig | dict | None) -> KVTransferConfig:
        """A KVTransferConfig from itself, a dict of its fields or None (defaults)."""
        return value if isinstance(value, cls) else cls(**(value or {}))

    def __post_init__(self) -> None:
        self._check_security()

    @property
    def advertised_host(self) -> str:
        """The host in this connector's locators. Raises ValueError for a wildcard bind with nothing to
        advertise: a locator of 0.0.0.0 would send other nodes' fetches to themselves."""
        host = self.grpc_advertise_host or self.grpc_host
        if host in WILDCARD_HOSTS:
            raise ValueError(f"grpc_host {self.grpc_host!r} listens on every interface: set grpc_advertise_host "
                             "to an address other nodes can reach")
        return host

    def for_node(self, node_ip: str) -> KVTransferConfig:
        """This config on a node whose IP is node_ip: a wildcard bind advertises that IP."""
        if self.grpc_host in WILDCARD_HOSTS and self.grpc_advertise_host is None:
            return replace(self, grpc_advertise_host=node_ip)
        return self

    @property
    def tls(self) -> bool:
        """True when the gRPC server and client use TLS (all three PEM files are set)."""
        return self.tls_cert_file is not None

    def resolved_token(self) -> str | None:
        """The shared token (auth_token, or the value of the variable auth_token_env names), or None.

        Raises ValueError if the named variable is unset or the token is too weak or not sendable as
        gRPC metadata: a worker configured for a token must not fall back to running open.
        """
        if self.auth_token_env is None:
            token = self.auth_token
        else:
            token = os.environ.get(self.auth_token_env)
            if not token:
                raise ValueError(f"auth_token_env: environment variable {self.auth_token_env} is unset or empty")
        if token is not None and not (len(token) >= 16 and token.isascii() and token.isprintable()
                                      and token == token.strip()):
            raise ValueError("the KV transfer token must be >= 16 printable ASCII characters without "
                             "surrounding spaces")
        return token

    def _check_security(self) -> None:
        check_tls_files(self.tls_cert_file, self.tls_key_file, self.tls_ca_file, self.tls_server_name, "KV transfer")
        if self.auth_token is not None and self.auth_token_env is not None:
            raise ValueError("set auth_token or auth_token_env, not both")
        secured = self.tls or self.auth_token is not None or self.auth_token_env is not None
        if secured and self.transport != "grpc":
            raise ValueError(f"TLS and tokens apply to the grpc transport only, not {self.transport!r}")
        if (self.transport == "grpc" and not self.tls and not self.allow_plaintext
                and not is_loopback(self.grpc_host)):
            raise ValueError(f"grpc_host {self.grpc_host!r} reaches beyond this machine: KV blocks would cross the "
                             "network in plaintext. Set tls_cert_file, tls_key_file and tls_ca_file, or "
                             "allow_plaintext: true on a network you trust")
        if self.auth_token is not None:
            self.resolved_token()  # a weak literal token fails now; an env token when the connector is made
