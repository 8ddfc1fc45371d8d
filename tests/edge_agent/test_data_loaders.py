"""The device-side data loaders (fedfleet.edge_agent.data): every format, and the one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from fedfleet.edge_agent.data import (
    check,
    load_csv,
    load_images,
    load_npz,
    load_path,
    load_python,
    load_source,
)
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.learners.base import LocalData


def test_npz_round_trip(tmp_path):
    x = np.arange(24, dtype=np.float64).reshape(6, 4)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 0, 1, 2]))
    d = load_npz(tmp_path / "d.npz")
    assert d.x.dtype == np.float32 and d.y.dtype == np.int64
    np.testing.assert_array_equal(d.x, x.astype(np.float32))


def test_npz_refuses_fractional_labels_and_missing_arrays(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3)), y=np.array([0.5, 1.0]))
    with pytest.raises(ConfigError, match="labels must be integer class indices"):
        load_npz(tmp_path / "d.npz")
    np.savez(tmp_path / "e.npz", features=np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="arrays 'x' and 'y'"):
        load_npz(tmp_path / "e.npz")
    with pytest.raises(ConfigError, match="no such file"):
        load_npz(tmp_path / "missing.npz")


def test_csv_label_column_anywhere(tmp_path):
    (tmp_path / "d.csv").write_text("a,kind,b\n1.5,2,3\n-1,0,4e-1\n")
    d = load_csv(tmp_path / "d.csv", label="kind")
    np.testing.assert_allclose(d.x, [[1.5, 3.0], [-1.0, 0.4]])
    assert d.y.tolist() == [2, 0]


@pytest.mark.parametrize(("text", "match"), [
    ("a,b\n1,2\n", "no label column 'label'"),
    ("a,label\n1,x\n", "every column must be numeric"),
    ("a,label\n1,2,3\n", "line 2 has a different number of columns"),
    ("label\n1\n", "only the label column"),
])
def test_csv_errors_say_what_is_wrong(tmp_path, text, match):
    (tmp_path / "d.csv").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_csv(tmp_path / "d.csv", where="[data] path")


def test_image_folder_is_greyscaled_resized_and_labelled_by_folder_index(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for folder, n in (("0_kettle", 2), ("3", 1)):
        (tmp_path / folder).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / folder / f"{i}.png")
    (tmp_path / "3" / "notes.txt").write_text("not an image")
    d = load_images(tmp_path, (1, 8, 12))
    assert d.x.shape == (3, 1, 8, 12) and d.y.tolist() == [0, 0, 3]
    assert 0.0 <= d.x.min() and d.x.max() <= 1.0
    assert load_images(tmp_path, (8, 12)).x.shape == (3, 8, 12)
    (tmp_path / "fridge").mkdir()
    with pytest.raises(ConfigError, match="must be named by its class index"):
        load_images(tmp_path, (1, 8, 12))


def test_python_loader_and_its_errors(tmp_path):
    (tmp_path / "loader.py").write_text(
        "import numpy as np\n"
        "def load():\n    return np.ones((4, 2)), np.array([0, 1, 1, 0])\n"
        "def bad():\n    return np.ones((4, 2))\n"
        "def boom():\n    raise RuntimeError('sensor offline')\n")
    d = load_python("loader.py:load", tmp_path)
    assert d.x.shape == (4, 2) and d.y.tolist() == [0, 1, 1, 0]
    with pytest.raises(ConfigError, match=r"must return a tuple \(x, y\)"):
        load_python("loader.py:bad", tmp_path)
    with pytest.raises(ConfigError, match="raised RuntimeError: sensor offline"):
        load_python("loader.py:boom", tmp_path)
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        load_python("loader.py:nope", tmp_path)
    with pytest.raises(ConfigError, match="'loader.py:function'"):
        load_python("loader.py", tmp_path)


def test_path_picks_the_format_and_source_needs_exactly_one_key(tmp_path):
    (tmp_path / "d.csv").write_text("label,v\n1,2\n")
    assert load_path("d.csv", base_dir=tmp_path).x.shape == (1, 1)
    with pytest.raises(ConfigError, match="exactly one of 'path'"):
        load_source({"path": "d.csv", "loader": "x.py:f"}, tmp_path, "[data]")
    with pytest.raises(ConfigError, match=r"^\[eval\] path: no such file"):
        load_source({"path": "missing.npz"}, tmp_path, "[eval]")
    with pytest.raises(ConfigError, match="format 'parquet' is unknown"):
        load_source({"path": "d.csv", "format": "parquet"}, tmp_path, "[data]")


def test_check_reshapes_and_refuses_nan_shapes_and_labels():
    d = LocalData(np.zeros((3, 8), np.float32), np.array([0, 1, 2]))
    assert check(d, "[data]", [2, 4], 3).x.shape == (3, 2, 4)
    with pytest.raises(ConfigError, match=r"samples have shape \(8,\), the model's input_shape is \[1, 256\]"):
        check(d, "[data]", [1, 256], 3)
    with pytest.raises(ConfigError, match=r"labels span 0..2, outside 0..1"):
        check(d, "[data]", None, 2)
    bad = LocalData(np.array([[0.0, np.nan], [1.0, 2.0]], np.float32), np.array([0, 1]))
    with pytest.raises(ConfigError, match="1 sample"):
        check(bad, "[data]", None, 2)


def test_agent_cli_reads_a_csv_and_reshapes_it_to_the_input_shape(tmp_path):
    import argparse

    from fedfleet.edge_agent.cli import _local_data

    (tmp_path / "plug.csv").write_text("label,i0,i1,i2,i3\n2,0.1,0.2,0.3,0.4\n0,1,2,3,4\n")
    args = argparse.Namespace(data=str(tmp_path / "plug.csv"), label_column=None, input_shape="1,4")
    d = _local_data(args)
    assert d.x.shape == (2, 1, 4) and d.y.tolist() == [2, 0]
    args.input_shape = "1,5"
    with pytest.raises(ConfigError, match=r"--data .*plug.csv: samples have shape \(4,\)"):
        _local_data(args)
