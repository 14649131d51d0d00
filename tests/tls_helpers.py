"""Certificates for TLS tests, made with `cryptography` when a test needs them (no files ship)."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def loopback_names() -> list[x509.GeneralName]:
    """Subject alternative names for a server on this machine: 127.0.0.1 and localhost."""
    return [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    cert: str
    key: str
    ca: str

    def config(self, **kwargs: object) -> dict:
        return {"tls_cert_file": self.cert, "tls_key_file": self.key, "tls_ca_file": self.ca, **kwargs}


def write_self_signed(directory: Path, common_name: str, sans: list[x509.GeneralName]) -> TLSFiles:
    """A self-signed certificate (its own CA) valid for `sans`; PEM files in directory."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return TLSFiles(str(cert_path), str(key_path), str(cert_path))


