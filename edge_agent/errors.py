"""Typed errors shared by the edge agent and the coordinator. Each message says what was wrong and what to do."""

from __future__ import annotations


class FedfleetError(Exception):
    """Base class of every fedfleet error."""


class ProtocolError(FedfleetError):
    """A message on the wire is malformed, oversized, unsigned, stale or otherwise refused.

    `reason` is a short machine-readable tag that lands in the ledger as `rejected:<reason>`.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class CodecError(ProtocolError):
    """A compressed payload is truncated, garbage, or would exceed its size cap when decoded."""

    def __init__(self, detail: str, reason: str = "codec") -> None:
        super().__init__(reason, detail)


class ConfigError(FedfleetError):
    """A configuration file or option is wrong. The message names the file and the field."""


class ModelError(FedfleetError):
    """A model file or package is corrupt, truncated, or does not match its manifest."""
