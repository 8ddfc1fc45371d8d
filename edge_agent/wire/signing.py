"""The coordinator's Ed25519 signing key: make it, derive its public half, sign downlink bytes, verify them.

The coordinator keeps a 32-byte seed (`coordinator.key`, 64 hex characters, mode 0600); each agent pins the
32-byte public key (`coordinator.pub`, 64 hex characters) at provisioning. Model packages, tasks and
broadcasts carry a signature under the seed (see `protocol.seal_signed`); agents verify it with the pinned
public key and refuse everything else. A fleet's name is never a key.

Agents that share a process (an emulated fleet, the demo) all receive the same broadcast bytes: a signature
that verified once is remembered in a `VerifiedSignatures` by the SHA-256 of (key, message, signature), so
the same bytes are not verified again by every agent (a hash costs a tenth of a verification). Different
bytes always verify. The agents of one `fedfleet.edge_agent.host.Host` share one `VerifiedSignatures`;
`verify` without one checks every signature.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedfleet.edge_agent.errors import ConfigError, ProtocolError

SEED_BYTES = 32
PUBLIC_BYTES = 32
SIGNATURE_BYTES = 64

_private_cache: dict[bytes, Ed25519PrivateKey] = {}
VERIFIED_KEEP = 16  # messages remembered as verified (the current broadcasts, not a history)


class VerifiedSignatures:
    """The public keys parsed and the newest `keep` messages verified for the agents of one Host."""

    def __init__(self, keep: int = VERIFIED_KEEP) -> None:
        self.keep = int(keep)
        self._keys: dict[bytes, Ed25519PublicKey] = {}
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def key(self, public: bytes) -> Ed25519PublicKey:
        """`public` parsed (once per Host); ProtocolError("bad_signature") if it is not a 32-byte key."""
        key = self._keys.get(public)
        if key is None:
            key = _public(public)
            with self._lock:
                self._keys[public] = key
        return key

    def seen(self, fingerprint: bytes) -> bool:
        """True if a message with this fingerprint verified before (and keep it among the newest)."""
        with self._lock:
            if fingerprint in self._seen:
                self._seen.move_to_end(fingerprint)
                return True
            return False

    def remember(self, fingerprint: bytes) -> None:
        with self._lock:
            self._seen[fingerprint] = None
            while len(self._seen) > self.keep:
                self._seen.popitem(last=False)


def new_signing_seed() -> bytes:
    """32 random bytes: the coordinator's private key seed."""
    return os.urandom(SEED_BYTES)


def _private(seed: bytes) -> Ed25519PrivateKey:
    key = _private_cache.get(seed)
    if key is None:
        if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
            raise ConfigError(f"the coordinator signing key must be {SEED_BYTES} bytes")
        key = _private_cache[seed] = Ed25519PrivateKey.from_private_bytes(seed)
    return key


def public_key(seed: bytes) -> bytes:
    """The raw 32-byte public key of `seed`."""
    return _private(seed).public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(seed: bytes, data: bytes) -> bytes:
    """The 64-byte Ed25519 signature of `data` under `seed`."""
    return _private(seed).sign(data)


def _public(public: bytes) -> Ed25519PublicKey:
    if not isinstance(public, bytes) or len(public) != PUBLIC_BYTES:
        raise ProtocolError("bad_signature", f"the pinned coordinator key must be {PUBLIC_BYTES} bytes")
    return Ed25519PublicKey.from_public_bytes(public)


def verify(public: bytes, data: bytes, signature: bytes, *, cache: VerifiedSignatures | None = None) -> None:
    """Raise ProtocolError("bad_signature") unless `signature` is `public`'s signature of `data`. With a
    `cache`, bytes that verified there before are accepted without verifying again."""
    key = cache.key(public) if cache is not None else _public(public)
    signature, data = bytes(signature), bytes(data)
    seen = hashlib.sha256(b"%d:" % len(data) + public + signature + data).digest()
    if cache is not None and cache.seen(seen):
        return
    try:
        key.verify(signature, data)
    except InvalidSignature:
        raise ProtocolError("bad_signature", "the signature does not verify under the coordinator's key") from None
    if cache is not None:
        cache.remember(seen)


def read_key_file(path: str | os.PathLike[str], what: str) -> bytes:
    """32 bytes from a file holding 64 hex characters (and optionally a newline). `what` names it in errors
    (e.g. "--signing-key-file")."""
    try:
        text = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{what} {path}: must hold 64 hex characters") from None
    if len(raw) != SEED_BYTES:
        raise ConfigError(f"{what} {path}: must hold 64 hex characters (32 bytes), found {len(raw)} bytes")
    return raw


def write_private_key_file(path: str | os.PathLike[str], seed: bytes) -> None:
    """Write `seed` as hex to a new file readable only by its owner (0600); refuse to overwrite."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"--signing-key-file {path}: exists; refusing to overwrite a signing key") from None
    except OSError as exc:
        raise ConfigError(f"--signing-key-file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(seed.hex() + "\n")
