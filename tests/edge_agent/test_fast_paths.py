"""The per-agent fast paths compute exactly what the plain versions they replaced compute.

FedZip: canonical codes by a cumulative sum, decode tables only for long streams, memoised block codes, the
gap parameter fitted for all candidates at once and costed by the sum of Huffman merges, byte windows by a
strided view. Each is checked here against a straightforward reference (the earlier code, kept in this
file). The payload bytes themselves are pinned by tests/edge_agent/test_fedzip_golden.py. Also: one ledger commit
per batch, the phase-wide weight cap, and the memo of verified downlink signatures.
"""

from __future__ import annotations

import importlib
import math
import os
import sqlite3

import numpy as np
import pytest

from fedfleet.coordinator.engine.update_guard import UpdateGuard
from fedfleet.coordinator.records.ledger import Ledger
from fedfleet.edge_agent.errors import ProtocolError
from fedfleet.edge_agent.fedzip import bitio, encodings, gapcodes, huffman
from fedfleet.edge_agent.wire import signing

quantize_module = importlib.import_module("fedfleet.edge_agent.fedzip.quantize")  # the package exports a function by that name

RNG = np.random.default_rng(7)


def _reference_codes(lengths: list[int]) -> tuple[np.ndarray, list[int], int]:
    """Canonical codes by the textbook loop (the earlier implementation)."""
    ln = np.asarray(lengths, dtype=np.int64)
    used = np.flatnonzero(ln)
    order = used[np.lexsort((used, ln[used]))]
    codes = np.zeros(ln.size, dtype=np.uint64)
    starts = []
    code, prev = 0, int(ln[order[0]])
    for j, s in enumerate(order.tolist()):
        length = int(ln[s])
        if j:
            code = (code + 1) << (length - prev)
        prev = length
        codes[s] = code
        starts.append(code << (32 - length))
    last = int(order[-1])
    return codes, starts, (int(codes[last]) + 1) << (32 - int(ln[last]))


def _random_weights(n: int) -> list[int]:
    kind = RNG.integers(3)
    if kind == 0:
        return RNG.integers(0, 5, n).tolist()
    if kind == 1:
        return RNG.integers(1, 10**9, n).tolist()
    return [int(x) for x in np.floor(2.0 ** RNG.uniform(0, 30, n))]


def test_canonical_codes_match_the_sequential_construction() -> None:
    for _ in range(400):
        w = _random_weights(int(RNG.integers(2, 257)))
        if sum(1 for x in w if x) < 2:
            continue
        lengths = huffman.code_lengths(w)
        code = huffman.from_lengths(lengths)
        codes, starts, end = _reference_codes(lengths)
        assert np.array_equal(code.codes, codes)
        assert code.starts.tolist() == starts and code.end == end


def test_incomplete_and_invalid_tables_behave_as_before() -> None:
    code = huffman.from_lengths([1, 2, 0, 3])  # Kraft sum 7/8: incomplete but valid
    codes, starts, end = _reference_codes([1, 2, 0, 3])
    assert np.array_equal(code.codes, codes) and code.end == end < 2**32
    with pytest.raises(huffman.CodecError, match="Kraft"):
        huffman.from_lengths([1, 1, 1])
    with pytest.raises(huffman.CodecError, match="outside"):
        huffman.from_lengths([25, 1])


def test_table_and_search_decode_the_same_symbols() -> None:
    for _ in range(60):
        w = _random_weights(int(RNG.integers(2, 60)))
        if sum(1 for x in w if x) < 2:
            continue
        code = huffman.from_weights(w)
        if code.maxlen > 16:
            continue
        p = np.asarray(w, float) / sum(w)
        sym = RNG.choice(len(w), size=int(RNG.integers(1, 3000)), p=p)
        data, nbits = huffman.encode(sym, code)
        win = bitio.bit_windows(data, nbits, 32)
        by_table = code.table()[(win >> np.uint64(32 - code.maxlen)).astype(np.int64)]
        by_search = np.searchsorted(code.starts, win, side="right") - 1
        valid = win < np.uint64(code.end)
        assert np.array_equal(by_table[valid], by_search[valid])
        assert np.array_equal(huffman.decode(data, nbits, sym.size, code), sym)


def test_code_cost_is_the_cost_of_the_code() -> None:
    for _ in range(500):
        w = _random_weights(int(RNG.integers(1, 45)))
        assert huffman.code_cost(w) == int(np.dot(huffman.code_lengths(w), w))
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])  # the length limit binds: halving changes the code
    assert huffman.code_cost(fib) == int(np.dot(huffman.code_lengths(fib), fib))


def test_block_code_is_the_code_of_the_block_weights() -> None:
    for counts in ([5, 0, 0], [0, 7], [3, 4, 5], [1, 1], [62, 1, 9], [2, 3, 4, 5], [10, 0, 20], [1] * 16):
        kp = len(counts)
        for block in range(1, encodings._max_block(kp) + 1):
            try:
                want = huffman.from_weights(encodings._block_weights(counts, block), max_len=None)
            except huffman.CodecError:  # a code longer than allowed: refused the same way
                with pytest.raises(huffman.CodecError):
                    encodings._block_code(counts, block)
                continue
            got = encodings._block_code(counts, block)
            assert got.single == want.single
            assert np.array_equal(got.lengths, want.lengths) and np.array_equal(got.codes, want.codes)


def _reference_choose_b(v: np.ndarray) -> int:
    mean = float(v.mean()) + 1.0 if v.size else 1.0
    b0 = max(0, round(math.log2(max(mean * math.log(2), 1.0))))
    e = gapcodes.bitlength(v)
    best, best_b = None, 0
    for b in range(0, min(gapcodes.MAX_VALUE_BITS - 2, b0 + 2) + 1):
        eu = np.maximum(e - b, 0)
        linear = eu <= 4
        sym = np.where(linear, v >> b, gapcodes.LINEAR + eu - 5)
        raw_bits = b * int(linear.sum()) + int((e - 1)[~linear].sum())
        counts = np.bincount(sym)
        cost = int(np.dot(huffman.code_lengths(counts.tolist()), counts)) + raw_bits + 16 + 5 * counts.size
        if best is None or cost < best:
            best, best_b = cost, b
    return best_b


def test_gap_parameter_fit_matches_the_per_candidate_loop() -> None:
    for _ in range(300):
        m = int(RNG.integers(1, 400))
        kind = RNG.integers(3)
        if kind == 0:
            v = RNG.geometric(1 / float(RNG.uniform(1, 2000)), m) - 1
        elif kind == 1:
            v = np.where(RNG.random(m) < 0.8, 0, RNG.integers(0, 10**6, m))
        else:
            v = RNG.integers(0, 2**int(RNG.integers(1, 30)), m)
        v = v.astype(np.int64)
        assert gapcodes.choose_b(v) == _reference_choose_b(v)


def test_byte_windows_match_eight_shifted_passes() -> None:
    buf = RNG.integers(0, 256, 700, dtype=np.uint8).tobytes()
    for nbits in (1, 7, 8, 9, 63, 64, 65, 1000, 5599, 5600):
        padded = bitio._padded(buf, nbits)
        n = (nbits + 7) // 8 + 1
        ref = np.zeros(n, dtype=np.uint64)
        for j in range(8):
            ref |= padded[j : j + n].astype(np.uint64) << np.uint64(56 - 8 * j)
        got = bitio.byte_windows(buf, nbits)
        assert got.dtype == np.uint64 and np.array_equal(got, ref)


def test_ledger_batch_commits_once_at_the_end(tmp_path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    other = sqlite3.connect(tmp_path / "ledger.sqlite")
    with ledger.batch():
        for i in range(5):
            ledger.record("r", 1, f"a{i}", "ok", bytes_up=i)
        assert len(ledger.query("SELECT * FROM agent_rounds")) == 5  # visible on its own connection
        assert other.execute("SELECT count(*) FROM agent_rounds").fetchone()[0] == 0  # not yet committed
    assert other.execute("SELECT count(*) FROM agent_rounds").fetchone()[0] == 5
    ledger.record("r", 2, "a0", "late")  # outside a batch every write commits at once
    assert other.execute("SELECT count(*) FROM agent_rounds").fetchone()[0] == 6
    with pytest.raises(TypeError):
        ledger.record("r", 2, "a0", "ok", nonsense=1)
    ledger.close()


def test_phase_weight_limit_is_the_per_result_cap() -> None:
    guard = UpdateGuard(weight_cap=4.0)
    announced = [100, 120, 0, 90, 2**31]
    limit = guard.weight_limit(announced)
    assert limit == 4 * 100  # the low median of the positive counts: one liar cannot raise it
    for claimed, own in ((50, 100), (10**9, 2**31), (10**9, None), (0, 5)):
        assert guard.weight(claimed, own, limit=limit) == guard.weight(claimed, own, announced)
    assert guard.weight(10**9, None, limit=None) == 10**9  # no counts announced: no cap
    assert UpdateGuard(weight_cap=0).weight_limit(announced) is None


def test_a_remembered_signature_never_vouches_for_other_bytes() -> None:
    seed = os.urandom(32)
    pub = signing.public_key(seed)
    data = os.urandom(5000)
    sig = signing.sign(seed, data)
    signing.verify(pub, data, sig)
    signing.verify(pub, data, sig)  # remembered: still accepted
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    for args in ((pub, data[:-1] + bytes([data[-1] ^ 1]), sig), (pub, data, flipped),
                 (signing.public_key(os.urandom(32)), data, sig), (pub, data + b"\0", sig)):
        with pytest.raises(ProtocolError):
            signing.verify(*args)


def test_one_kept_entry_is_what_top_z_and_k_means_give() -> None:
    for x in (np.array([0.5, -2.0, 2.0, 1.0], np.float32), np.zeros(5, np.float32), np.array([-0.0, 0.0], np.float32),
              np.array([3e38], np.float32), RNG.normal(size=(4, 8)).astype(np.float32), np.array([1e-45], np.float32)):
        flat = x.ravel()
        pos = quantize_module.top_z(np.abs(flat), 1)
        pos = pos[flat[pos] != 0]
        s = quantize_module.sparsify(x, 1, 3)
        assert np.array_equal(s.positions, pos) and s.positions.dtype == np.int64
        if pos.size:
            c, ids = quantize_module.kmeans_1d(flat[pos].astype(np.float64), 3)
            assert np.array_equal(s.centroids, c.astype(np.float32)) and np.array_equal(s.ids, ids)
        else:
            assert s.centroids.size == 0 and s.ids.size == 0
