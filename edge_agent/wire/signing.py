"""The coordinator's Ed25519 signing key: make it, derive its public half, sign downlink bytes, verify them.

The coordinator keeps a 32-byte seed (`coordinator.key`, 64 hex characters, mode 0600); each agent pins the
32-byte public key (`coordinator.pub`, 64 hex characters) at provisioning. Model packages, tasks and
broadcasts carry a signature under the seed (see `protocol.seal_signed`); agents verify it with the pinned
public key and refuse everything else. A fleet's name is never a key.

Agents that share a process (an emulated fleet, the demo) all receive the same broadcast bytes: a signature
that verified once is remembered by the SHA-256 of (key, message, signature), so the same bytes are not
verified again by every agent (a hash costs a tenth of a verification). Different bytes always verify.
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
_public_cache: dict[bytes, Ed25519PublicKey] = {}
_VERIFIED_KEEP = 16  # messages remembered as verified (the current broadcasts, not a history)
_verified: OrderedDict[bytes, None] = OrderedDict()
_verified_lock = threading.Lock()


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


def verify(public: bytes, data: bytes, signature: bytes) -> None:
    """Raise ProtocolError("bad_signature") unless `signature` is `public`'s signature of `data`."""
    key = _public_cache.get(public)
    if key is None:
        if not isinstance(public, bytes) or len(public) != PUBLIC_BYTES:
            raise ProtocolError("bad_signature", f"the pinned coordinator key must be {PUBLIC_BYTES} bytes")
        key = _public_cache[public] = Ed25519PublicKey.from_public_bytes(public)
    signature, data = bytes(signature), bytes(data)
    seen = hashlib.sha256(b"%d:" % len(data) + public + signature + data).digest()
    with _verified_lock:
        if seen in _verified:
            _verified.move_to_end(seen)
            return
    try:
        key.verify(signature, data)
    except InvalidSignature:
        raise ProtocolError("bad_signature", "the signature does not verify under the coordinator's key") from None
    with _verified_lock:
        _verified[seen] = None
        while len(_verified) > _VERIFIED_KEEP:
            _verified.popitem(last=False)


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
