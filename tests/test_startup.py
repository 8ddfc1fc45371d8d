"""Start-up, memory and exit: what the demo process imports, loads once, shares among its agents, and how
it leaves."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np

from coordinator import data as datasets


def _run(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


def test_digits_equals_sklearn_load_digits_exactly():
    from sklearn.datasets import load_digits

    ours = datasets.digits()
    ref = load_digits()
    assert ours.x.dtype == np.float32 and ours.y.dtype == np.int64
    assert ours.x.shape == (1797, 64) and ours.y.shape == (1797,)
    assert np.array_equal(ours.x, (ref.data / 16.0).astype(np.float32))
    assert np.array_equal(ours.y, ref.target.astype(np.int64))


def test_digits_callers_get_their_own_arrays():
    a = datasets.digits()
    a.x[0, 0] = 99.0
    a.y[0] = 7
    b = datasets.digits()
    assert b.x[0, 0] != 99.0 and b.y[0] == 0


def test_reading_digits_does_not_import_sklearn():
    r = _run("""
        import sys
        from coordinator import data
        d = data.digits()
        print(len(d), "sklearn" in sys.modules, "scipy" in sys.modules, "pandas" in sys.modules)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1797", "False", "False", "False"], r.stdout
