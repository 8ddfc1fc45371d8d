"""FedZip codec: exact round trips, the quantiser's decisions, hostile payloads, the bound, error feedback."""

from __future__ import annotations

import json
import math
import struct
import time
import tracemalloc

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedfleet.edge_agent.errors import CodecError, ConfigError
from fedfleet.edge_agent.fedzip import (
    ENCODINGS,
    ErrorFeedback,
    FedZipParams,
    bound_bits,
    decode,
    encode,
    encode_and_quantize,
    quantize,
)
from fedfleet.edge_agent.fedzip.container import _HEAD, FLAG_ZSTD, MAGIC, VERSION, layout_crc
from fedfleet.edge_agent.fedzip.wire import Writer

CAP = 1 << 22


def layout_of(tensors: dict[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in tensors.items()]


def roundtrip(tensors: dict[str, np.ndarray], p: FedZipParams) -> tuple[bytes, dict, dict]:
    data = encode(tensors, p)
    return data, decode(data, layout_of(tensors), p, max_bytes=CAP), quantize(tensors, p)


def assert_same_bits(out: dict[str, np.ndarray], q: dict[str, np.ndarray]) -> None:
    assert list(out) == list(q)
    for k in q:
        assert out[k].dtype == np.float32 and q[k].dtype == np.float32
        assert out[k].shape == q[k].shape
        assert out[k].tobytes() == q[k].tobytes(), k


# -- round trips -----------------------------------------------------------------------------------------

finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
few_values = st.sampled_from([0.0, 1.0, -1.0, 2.5, -0.0, 1e-30, 3e38, -3e38])
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=12)


@st.composite
def tensor(draw) -> np.ndarray:
    shape = draw(shapes)
    kind = draw(st.sampled_from(["any", "few", "constant", "zero"]))
    if kind == "any":
        return draw(hnp.arrays(np.float32, shape, elements=finite32))
    if kind == "few":  # fewer than k distinct values, and many ties at the threshold
        return draw(hnp.arrays(np.float32, shape, elements=few_values))
    value = draw(finite32) if kind == "constant" else 0.0
    return np.full(shape, value, dtype=np.float32)


params = st.builds(
    FedZipParams,
    z=st.sampled_from([0.01, 0.05, 0.2, 0.5, 1.0]) | st.floats(1e-4, 1.0),
    k=st.integers(1, 6),
    encoding=st.sampled_from(ENCODINGS),
    zstd_level=st.sampled_from([0, 1, 3]),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors=st.dictionaries(st.sampled_from(["a", "b.weight", "c.bias", "z"]), tensor(), min_size=1, max_size=3),
       p=params)
def test_decode_of_encode_is_quantize_bit_for_bit(tensors, p):
    _, out, q = roundtrip(tensors, p)
    assert_same_bits(out, q)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_roundtrip_larger_gaussian_and_structured(encoding):
    rng = np.random.Generator(np.random.PCG64(3))
    low_rank = np.outer(rng.standard_normal(300), rng.standard_normal(200)).astype(np.float32)
    tensors = {"w": rng.standard_normal((300, 400)).astype(np.float32), "lr": low_rank,
               "b": rng.standard_normal(17).astype(np.float32)}
    for z in (0.003, 0.05):
        _, out, q = roundtrip(tensors, FedZipParams(z=z, encoding=encoding))
        assert_same_bits(out, q)


def test_dict_order_does_not_matter_and_output_follows_layout():
    rng = np.random.Generator(np.random.PCG64(1))
    t = {"b": rng.standard_normal(50).astype(np.float32), "a": rng.standard_normal((5, 6)).astype(np.float32)}
    p = FedZipParams(z=0.2)
    data = encode(t, p)
    assert data == encode(dict(reversed(list(t.items()))), p)
    out = decode(data, [("a", (5, 6)), ("b", (50,))], p, max_bytes=CAP)
    assert list(out) == ["a", "b"]


# -- quantiser decisions ---------------------------------------------------------------------------------

def test_topz_keeps_exactly_ceil_zn_even_with_ties():
    x = {"w": np.ones(100, dtype=np.float32)}
    q = quantize(x, FedZipParams(z=0.07, k=3))["w"]
    assert np.flatnonzero(q).tolist() == list(range(7))  # ties go to the lowest positions
    y = {"w": np.array([5, -5, 5, 1, -5, 0.5], dtype=np.float32)}
    assert np.count_nonzero(quantize(y, FedZipParams(z=0.5, k=3))["w"]) == 3


def test_pruned_entries_are_exact_zero_and_values_are_k_centroids():
    rng = np.random.Generator(np.random.PCG64(0))
    x = rng.standard_normal(10_000).astype(np.float32)
    q = quantize({"w": x}, FedZipParams(z=0.05, k=3))["w"]
    kept = np.flatnonzero(q)
    assert kept.size == 500
    assert set(kept.tolist()) == set(np.argsort(-np.abs(x))[:500].tolist())
    assert np.unique(q[kept]).size == 3
    assert (q[np.setdiff1d(np.arange(x.size), kept)] == 0).all()
    assert not np.signbit(q[q == 0]).any()  # +0.0, no bias and no negative zeros


def test_fewer_distinct_values_than_k_and_tiny_tensors():
    x = {"w": np.array([0, 3, 3, -3, 0, 3], dtype=np.float32), "t": np.array([7.0], np.float32),
         "e": np.zeros((0, 3), np.float32)}
    for enc in ENCODINGS:
        p = FedZipParams(z=1.0, k=8, encoding=enc)
        _, out, q = roundtrip(x, p)
        assert_same_bits(out, q)
        assert q["w"].tolist() == [0, 3, 3, -3, 0, 3] and q["t"].tolist() == [7.0]


def test_non_finite_input_is_refused():
    with pytest.raises(CodecError):
        encode({"w": np.array([1.0, np.nan], np.float32)}, FedZipParams())
    with pytest.raises(CodecError):
        encode({"w": np.array([1.0, np.inf], np.float32)}, FedZipParams())


# -- hostile payloads ------------------------------------------------------------------------------------

def small_payloads() -> list[tuple[bytes, dict, FedZipParams]]:
    rng = np.random.Generator(np.random.PCG64(7))
    t = {"w": rng.standard_normal((20, 30)).astype(np.float32), "b": rng.standard_normal(9).astype(np.float32)}
    out = []
    for enc in ENCODINGS:
        for level in (0, 3):
            p = FedZipParams(z=0.1, encoding=enc, zstd_level=level)
            out.append((encode(t, p), t, p))
    return out


def test_every_truncation_raises_codec_error():
    for data, t, p in small_payloads():
        lay = layout_of(t)
        for cut in range(len(data)):
            with pytest.raises(CodecError):
                decode(data[:cut], lay, p, max_bytes=CAP)
        with pytest.raises(CodecError):
            decode(data + b"\0", lay, p, max_bytes=CAP)


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=300), prefix=st.booleans(), enc=st.sampled_from(ENCODINGS))
def test_random_garbage_raises_codec_error(garbage, prefix, enc):
    p = FedZipParams(z=0.5, encoding=enc)
    lay = [("w", (40,))]
    head = _HEAD.pack(MAGIC, VERSION, ENCODINGS.index(enc) + 1, 0, layout_crc(lay)) + b"\x01" if prefix else b""
    try:
        out = decode(head + garbage, lay, p, max_bytes=CAP)
    except CodecError:
        return
    # a random body can happen to be valid: then it must still be a well-formed update
    assert out["w"].shape == (40,) and np.isfinite(out["w"]).all()


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_bit_flips_never_escape_as_other_errors(data):
    payload, t, p = data.draw(st.sampled_from(small_payloads()))
    i = data.draw(st.integers(0, len(payload) - 1))
    bit = data.draw(st.integers(0, 7))
    bad = bytearray(payload)
    bad[i] ^= 1 << bit
    try:
        out = decode(bytes(bad), layout_of(t), p, max_bytes=CAP)
    except CodecError:
        return
    for k, v in t.items():
        assert out[k].shape == v.shape and np.isfinite(out[k]).all()
        assert np.count_nonzero(out[k]) <= p.keep_count(v.size)


def zstd_payload(body_frame: bytes, lay) -> bytes:
    return _HEAD.pack(MAGIC, VERSION, 4, FLAG_ZSTD, layout_crc(lay)) + b"\x01" + body_frame


def test_zstd_frame_declaring_huge_size_is_refused_before_allocating():
    lay = [("w", (1000,))]
    p = FedZipParams()
    # a frame header claiming 2**40 bytes (single segment, 8-byte content size), then junk
    huge = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", 2**40) + b"\x01\x00\x00" * 4
    # and a genuine bomb: 200 MB of zeros compress to a few kB
    bomb = zstandard.ZstdCompressor(level=3).compress(b"\0" * (200 << 20))
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 100)
    for frame in (huge, bomb, no_size):
        tracemalloc.start()
        t0 = time.perf_counter()
        with pytest.raises(CodecError):
            decode(zstd_payload(frame, lay), lay, p, max_bytes=1 << 20)
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert elapsed < 0.5 and peak < 4 << 20


def test_oversized_payload_and_counts_are_refused():
    rng = np.random.Generator(np.random.PCG64(2))
    t = {"w": rng.standard_normal(1000).astype(np.float32)}
    lay = layout_of(t)
    data = encode(t, FedZipParams(z=0.5, zstd_level=0))
    with pytest.raises(CodecError, match="allowed"):  # m = 500 > ceil(0.01 * 1000)
        decode(data, lay, FedZipParams(z=0.01, zstd_level=0), max_bytes=CAP)
    with pytest.raises(CodecError, match="cap"):
        decode(data, lay, FedZipParams(z=0.5), max_bytes=len(data) - 1)
    # a body whose first count is a huge varint
    w = Writer()
    w.varint(2**62)
    body = _HEAD.pack(MAGIC, VERSION, 4, 0, layout_crc(lay)) + b"\x01" + w.getvalue()
    t0 = time.perf_counter()
    with pytest.raises(CodecError):
        decode(body, lay, FedZipParams(), max_bytes=CAP)
    assert time.perf_counter() - t0 < 0.1


def test_layout_and_encoding_mismatch_are_refused():
    rng = np.random.Generator(np.random.PCG64(2))
    t = {"w": rng.standard_normal((10, 10)).astype(np.float32), "b": np.ones(10, np.float32)}
    p = FedZipParams(z=0.1)
    data = encode(t, p)
    for lay in ([("w", (100,)), ("b", (10,))], [("w", (10, 10))], [("w", (10, 10)), ("c", (10,))],
                [("w", (10, 10)), ("b", (10,)), ("x", (1,))]):
        with pytest.raises(CodecError, match="layout"):
            decode(data, lay, p, max_bytes=CAP)
    with pytest.raises(CodecError, match="encoding"):
        decode(data, layout_of(t), FedZipParams(z=0.1, encoding="e3"), max_bytes=CAP)
    with pytest.raises(CodecError, match="magic"):
        decode(b"XX" + data[2:], layout_of(t), p, max_bytes=CAP)


# -- the bound -------------------------------------------------------------------------------------------

def test_bound_bits_by_hand():
    q = {"w": np.array([0, 1, 0, 2], np.float32), "z": np.zeros(3, np.float32)}
    assert bound_bits(q) == pytest.approx(math.log2(6) + 2 * 1.0 + 64)


def test_bound_ratios_are_sane_on_uniform_positions():
    rng = np.random.Generator(np.random.PCG64(5))
    t = {"w": rng.standard_normal(200_000).astype(np.float32)}
    sizes = {}
    for enc in ENCODINGS:
        p = FedZipParams(z=0.01, encoding=enc, zstd_level=0)
        data, q = encode_and_quantize(t, p)
        sizes[enc] = 8 * len(data) / bound_bits(q)
    assert 0.98 < sizes["e4"] < 1.05  # near the bound, never far below it on random positions
    assert sizes["e3"] > sizes["e4"] * 1.2  # Elias-gamma pays about 2 log2(gap)
    assert sizes["e1"] > 200_000 / bound_bits(q)  # E1 spends at least one bit per entry
    assert sizes["e2"] == pytest.approx((2000 * 18 + 3 * 32) / bound_bits(q), rel=0.01)


# -- error feedback --------------------------------------------------------------------------------------

def test_error_feedback_keeps_the_residual_and_telescopes():
    rng = np.random.Generator(np.random.PCG64(9))
    p = FedZipParams(z=0.05)
    ef = ErrorFeedback()
    total_update = np.zeros((30, 20), np.float32)
    total_sent = np.zeros((30, 20), np.float32)
    for _ in range(6):
        u = {"w": rng.standard_normal((30, 20)).astype(np.float32)}
        comp = ef.compensate(u)
        if ef.residual:
            np.testing.assert_array_equal(comp["w"], u["w"] + ef.residual["w"])
        data, q = encode_and_quantize(comp, p)
        np.testing.assert_array_equal(decode(data, layout_of(u), p, max_bytes=CAP)["w"], q["w"])
        ef.update(comp, q)
        np.testing.assert_array_equal(ef.residual["w"], comp["w"] - q["w"])
        total_update += u["w"]
        total_sent += q["w"]
    # nothing is lost: what was sent plus what is still owed equals everything that was produced
    np.testing.assert_allclose(total_sent + ef.residual["w"], total_update, atol=1e-4)
    assert ef.norm() > 0
    with pytest.raises(ConfigError):
        ef.compensate({"w": np.zeros(3, np.float32)})
    ef.reset()
    assert ef.compensate({"w": np.ones(3, np.float32)})["w"].tolist() == [1, 1, 1]


# -- parameters ------------------------------------------------------------------------------------------

def test_params_validate_and_round_trip():
    p = FedZipParams.from_dict({"z": 0.05, "encoding": "e3"})
    assert p == FedZipParams(z=0.05, k=3, encoding="e3", zstd_level=3)
    assert FedZipParams.from_dict(p.to_dict()) == p
    for bad, field in (({"z": 0}, "z"), ({"z": 1.5}, "z"), ({"k": 0}, "k"), ({"k": True}, "k"),
                       ({"encoding": "e9"}, "encoding"), ({"zstd_level": -1}, "zstd_level"),
                       ({"zz": 1}, "zz")):
        with pytest.raises(ConfigError, match=field):
            FedZipParams.from_dict(bad)
    assert FedZipParams(z=0.07).keep_count(100) == 7
    assert FedZipParams(z=0.01).keep_count(10) == 1


# -- benchmark smoke -------------------------------------------------------------------------------------

def test_bench_codec_smoke(tmp_path, capsys):
    from fedfleet.tools.bench import codec as bench_codec

    path = tmp_path / "codec.json"
    assert bench_codec.main(["--d", "4000", "--steps", "2", "--repeat", "1", "--json", str(path)]) == 0
    from fedfleet.tools.bench.output import details

    result = json.loads(path.read_text())
    captured = capsys.readouterr()
    assert json.loads(captured.out) == result
    assert "[bench codec +" in captured.err and "timed encode/decode runs" in captured.err  # progress
    assert set(result) == {"d", "z", "encoding", "ratio_vs_float32", "bound_ratio", "encode_mb_s", "decode_mb_s",
                           "zstd_only_ratio"}
    result.update(details(captured.err))
    assert result["d"] == 4000 and result["encoding"] == "e4"
    assert result["ratio_vs_float32"] > result["zstd_only_ratio"]
    assert set(result["encodings"]) == set(ENCODINGS)
