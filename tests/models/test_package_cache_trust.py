"""The package cache cannot be planted (issue item 7): the coordinator signs what the cache returns, so a
package another local user put there, a file writable by others, or bytes that differ from what was stored
are rebuilt, never returned; the directory is the user's own, mode 0700."""

from __future__ import annotations

import os
import stat

import pytest

from fedfleet.models import package_cache
from fedfleet.models.package import build_package

ARGS = {"head_hidden": 32, "seed": 0}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFLEET_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "packages"


@pytest.fixture(scope="module")
def built() -> bytes:
    return build_package("transfer", **ARGS)


def _key() -> str:
    return package_cache.cache_key("transfer", dataset="digits", head_layers=1, **ARGS)


def test_the_cache_directory_is_created_mode_0700(cache, built):
    assert package_cache.package("transfer", **ARGS) == built
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(cache.parent).st_mode) == 0o700
    (f,) = cache.glob("*.zip")
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600 and f.name.startswith(_key())


def test_a_planted_package_is_rebuilt_not_returned(cache, built):
    cache.mkdir(parents=True)
    planted = b"PK\x03\x04 a package someone else built"
    for name in (f"{_key()}.zip", f"{_key()}-{'0' * 64}.zip"):  # the old name, and a forged digest in the name
        (cache / name).write_bytes(planted)
    assert package_cache.package("transfer", **ARGS) == built
    assert all(p.read_bytes() == built for p in cache.glob("*.zip"))


def test_a_file_whose_bytes_changed_is_rebuilt(cache, built):
    assert package_cache.package("transfer", **ARGS) == built
    (f,) = cache.glob("*.zip")
    f.write_bytes(built[:-1] + bytes([built[-1] ^ 1]))  # same name, other bytes
    assert package_cache.package("transfer", **ARGS) == built


def test_a_file_writable_by_others_is_not_used(cache, built):
    import hashlib

    cache.mkdir(parents=True)
    other = build_package("transfer", head_hidden=16, seed=0)  # a real package, of other arguments
    path = cache / f"{_key()}-{hashlib.sha256(other).hexdigest()}.zip"  # its digest, honestly named
    path.write_bytes(other)
    os.chmod(path, 0o666)
    assert package_cache.package("transfer", **ARGS) == built


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_file_or_directory_owned_by_another_user_is_not_used(cache, built):
    import hashlib

    cache.mkdir(parents=True)
    other = build_package("transfer", head_hidden=16, seed=0)
    path = cache / f"{_key()}-{hashlib.sha256(other).hexdigest()}.zip"
    path.write_bytes(other)
    os.chmod(path, 0o600)
    os.chown(path, 65534, 65534)
    assert package_cache.package("transfer", **ARGS) == built
    for p in cache.glob("*.zip"):
        p.unlink()
    path.write_bytes(other)
    os.chown(path, 0, 0)
    os.chown(cache, 65534, 65534)  # the whole directory is someone else's: not used at all
    assert package_cache.package("transfer", **ARGS) == built
    assert path.read_bytes() == other  # and not written to


def test_a_loose_directory_is_tightened_and_an_open_parent_is_not_trusted(cache, tmp_path, built, monkeypatch):
    cache.mkdir(parents=True)
    os.chmod(cache, 0o777)
    assert package_cache.package("transfer", **ARGS) == built
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # anyone may replace `packages/` here
    monkeypatch.setenv("FEDFLEET_CACHE_DIR", str(shared))
    (shared / "packages").mkdir(mode=0o700)
    assert package_cache.package("transfer", **ARGS) == built
    assert not list((shared / "packages").glob("*.zip"))  # nothing stored where it cannot be trusted
