"""Every loader checks sizes before it allocates (issue item 12): an .npz member whose header declares
2^40 floats, a malformed header, or a deflate bomb is a one-line error without the memory; `generate`'s
prompt '³ right' and `--seed=-1` are one-line errors."""

from __future__ import annotations

import io
import resource
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from fedfleet.edge_agent.errors import ConfigError, ModelError
from fedfleet.edge_agent.mtvg.prompts import parse_prompts
from fedfleet.edge_agent.mtvg.sample import load_weights
from fedfleet.edge_agent.npz import read_npz
from fedfleet.edge_agent.state import AgentState


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    text += b" " * (63 - (len(text) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def _npz(members: dict[str, bytes], compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name + ".npy", data)
    return buf.getvalue()


def _bomb() -> bytes:
    """A ~1 MB file that inflates to 1 GiB of zeros, with an honest header."""
    n = 1 << 28  # float32s: 1 GiB
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("fc0.weight.npy", "w", force_zip64=True) as fh:
        fh.write(_npy_header((n,)))
        chunk = bytes(1 << 24)
        for _ in range((4 * n) // len(chunk)):
            fh.write(chunk)
    return buf.getvalue()


def test_arrays_within_the_cap_round_trip(tmp_path):
    a, b = np.arange(12, dtype=np.float32).reshape(3, 4), np.arange(5, dtype=np.int64)
    np.savez_compressed(tmp_path / "x.npz", a=a, b=b, f=np.asfortranarray(a))
    got = read_npz(tmp_path / "x.npz", max_bytes=1 << 20)
    assert np.array_equal(got["a"], a) and np.array_equal(got["b"], b) and np.array_equal(got["f"], a)


@pytest.mark.parametrize("member, needle", [
    (_npy_header((1 << 40,)), "declares (1099511627776,) of float32"),
    (b"\x93NUMPY\x01\x00\x10\x00{'descr': garbage", "malformed .npy header"),
    (b"not npy at all", "malformed .npy header"),
    (_npy_header((4,), "|O"), "not plain numbers"),
    (_npy_header((4,)) + bytes(8), "holds 8 bytes of data, its header declares 16"),
    (_npy_header((1,)) + bytes(8), "holds 4+ bytes"),
])
def test_a_hostile_member_is_refused_before_it_is_allocated(member, needle):
    with pytest.raises(ValueError) as err:
        read_npz(_npz({"fc0.weight": member}), max_bytes=1 << 30)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_deflate_bomb_is_refused_without_inflating_it(tmp_path):
    path = tmp_path / "denoiser.npz"
    path.write_bytes(_bomb())
    assert path.stat().st_size < 4 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="more than the") as err:
        load_weights(path)
    assert time.perf_counter() - t0 < 2.0 and "\n" not in str(err.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # kB: nothing near 1 GiB


@pytest.mark.parametrize("member", [_npy_header((1 << 40,)), b"\x93NUMPY\x01\x00\x10\x00{'descr': garbage"])
def test_denoiser_weights_with_a_hostile_header_are_a_model_error(tmp_path, member):
    path = tmp_path / "denoiser.npz"
    path.write_bytes(_npz({"fc0.weight": member}))
    with pytest.raises(ModelError, match="cannot read denoiser weights"):
        load_weights(path)


def test_error_feedback_with_a_hostile_header_is_dropped_not_allocated(tmp_path):
    state = AgentState(tmp_path)
    state._feedback_path("fedavg").write_bytes(_npz({"w": _npy_header((1 << 40,))}))
    assert state.feedback("fedavg") == {}


def test_a_prompt_with_a_unicode_digit_is_one_line():
    with pytest.raises(ConfigError, match="unknown token '³'"):
        parse_prompts("³ right")


@pytest.mark.parametrize("args, needle", [(["--prompts", "³ right"], "unknown token"), (["--seed=-1"], "--seed")])
def test_generate_input_errors_are_one_line(tmp_path, args, needle):
    (tmp_path / "w.npz").write_bytes(b"x")
    base = ["--prompts", "3 right", "--out", str(tmp_path / "out"), "--weights", str(tmp_path / "w.npz")]
    r = subprocess.run([sys.executable, "-m", "fedfleet.coordinator.cli", "generate", *base, *args],
                       capture_output=True, text=True, timeout=120)
    err = r.stderr.strip()
    assert r.returncode == 2 and "Traceback" not in err and "\n" not in err and needle in err, err
