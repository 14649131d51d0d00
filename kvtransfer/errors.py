"""What can go wrong moving KV blocks, as exceptions an importer can act on.

Every failure of a transfer raises a KVTransferError subclass, so a decode
worker needs one `except KVTransferError` to fall back to recomputing the
prefill; the subclass says why (for metrics and logs).
"""

from __future__ import annotations


class KVTransferError(Exception):
    """A KV transfer failed; the payload must not be used."""


class KVTimeoutError(KVTransferError):
    """The payload did not arrive within the importer's timeout_s."""


class KVCorruptError(KVTransferError):
    """The bytes received are not the bytes exported: checksum mismatch, truncated, or malformed framing."""


class KVLayoutError(KVTransferError):
    """Layout, dtype or shape of the export does not match what the importer expects."""


class KVNotFoundError(KVTransferError):
    """The export is unknown, was released, or its lease expired."""


class KVAuthError(KVTransferError):
    """The exporter refused the fetch: wrong or missing shared token, or the TLS handshake failed."""
