"""A user's own backbone as a package (fedfleet.models.own_model): torch module -> int8 package -> the edge's
forward agrees with torch; the package is cached by its inputs; ready ONNX files; the [model] errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfleet.edge_agent.errors import ConfigError, ModelError
from fedfleet.edge_agent.model import EdgeModel
from fedfleet.edge_agent.nn import mlp
from fedfleet.models import own_model

MODEL_PY = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 32, 24), nn.ReLU())

def dense():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(32, 16), nn.ReLU())

def not_a_module():
    return 3
"""


@pytest.fixture
def job_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFLEET_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "model.py").write_text(MODEL_PY)
    return tmp_path


def _calibration(n: int = 200) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.sin(np.linspace(0, 6, 32) * rng.uniform(0.5, 3, (n, 1, 1))).astype(np.float32)


def test_torch_backbone_to_package_matches_torch_within_int8_tolerance(job_dir):
    spec = own_model.parse({"torch": "model.py:make", "input_shape": [1, 32], "head_hidden": 0, "classes": 3}, job_dir)
    x = _calibration()
    edge = EdgeModel.from_bytes(own_model.build(spec, x))
    assert edge.manifest["dataset"] == "custom" and edge.head_sizes == [24, 3] and edge.input_shape == (1, 32)
    import importlib.util

    mod_spec = importlib.util.spec_from_file_location("user_model", job_dir / "model.py")
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    with torch.no_grad():
        want = mod.make().eval()(torch.from_numpy(x)).numpy()
    got = edge.features(x)
    # int8 QDQ: activations in uint8 steps of (range / 255); allow a few steps of the output's range
    step = (want.max() - want.min()) / 255
    assert np.abs(got - want).max() < 6 * step, np.abs(got - want).max() / step
    logits_edge = edge.logits(edge.head_init, x)
    logits_torch = mlp.forward(edge.head_init, want)
    assert (logits_edge.argmax(1) == logits_torch.argmax(1)).mean() > 0.95


def test_second_build_comes_from_the_cache_and_a_changed_input_is_a_new_build(job_dir, monkeypatch):
    table = {"torch": "model.py:make", "input_shape": [1, 32], "classes": 3}
    spec = own_model.parse(table, job_dir)
    x = _calibration()
    first = own_model.build(spec, x)
    assert len(list((job_dir / "cache" / "packages").glob("custom-*.zip"))) == 1

    def no_export(*args, **kwargs):
        raise AssertionError("rebuilt although the inputs did not change")

    monkeypatch.setattr(own_model, "_build", no_export)
    assert own_model.build(spec, x) == first
    with pytest.raises(AssertionError, match="rebuilt"):
        own_model.build(own_model.parse({**table, "head_hidden": 8}, job_dir), x)
    with pytest.raises(AssertionError, match="rebuilt"):
        own_model.build(spec, x + 1)


def test_ready_onnx_backbone_and_litert_twin(job_dir):
    from fedfleet.models.export_onnx import export_fp32

    mod = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU())
    (job_dir / "bb.onnx").write_bytes(export_fp32(mod, (32,), input_name="signal", output_name="emb"))
    x = _calibration()[:, 0, :]
    edge = EdgeModel.from_bytes(own_model.build(own_model.parse({"onnx": "bb.onnx", "classes": 4}, job_dir), x))
    assert edge.input_shape == (32,) and edge.feature_dim == 16 and edge.backbone_spec["input"] == "signal"
    with torch.no_grad():
        np.testing.assert_allclose(edge.features(x), mod(torch.from_numpy(x)).numpy(), atol=1e-5)
    # a ready TFLite file alone: a LiteRT-only package
    from fedfleet.models.export_tflite import export_backbone

    (job_dir / "bb.tflite").write_bytes(export_backbone(mod, (32,), x, input_name="signal", output_name="emb"))
    blob = own_model.build(own_model.parse({"tflite": "bb.tflite", "classes": 4, "head_hidden": 0}, job_dir), x)
    lite = EdgeModel.from_bytes(blob, runtime="litert")
    assert lite.backbone_spec["file"] == "backbone.tflite" and lite.head_sizes == [16, 4]
    with pytest.raises(ModelError, match="none runs on runtime 'onnxruntime'"):
        EdgeModel.from_bytes(blob)
    # a Linear backbone has an int8 TFLite twin: one package for both runtimes
    spec = own_model.parse({"torch": "model.py:dense", "input_shape": [32], "classes": 4}, job_dir)
    blob = own_model.build(spec, x, runtime="litert")
    onnx_f = EdgeModel.from_bytes(blob).features(x)
    tfl_f = EdgeModel.from_bytes(blob, runtime="litert").features(x)
    assert np.abs(onnx_f - tfl_f).max() < 0.05 * (onnx_f.max() - onnx_f.min())


@pytest.mark.parametrize(("table", "match"), [
    ({"torch": "model.py:make", "input_shape": [1, 32], "classes": 3, "runtime": "x"}, r"unknown key\(s\) \['runtime'\]"),
    ({"torch": "nope.py:make", "input_shape": [1, 32], "classes": 3}, r"field 'torch': no such file .*nope.py"),
    ({"torch": "model.py:make", "classes": 3}, "field 'input_shape' is required"),
    ({"torch": "model.py:make", "input_shape": [1, 32], "classes": 1}, "field 'classes'"),
    ({"onnx": "missing.onnx", "classes": 3}, "field 'onnx': no such file"),
    ({"classes": 3}, "name the backbone"),
])
def test_model_table_errors(job_dir, table, match):
    with pytest.raises(ConfigError, match=r"^\[model\]"):
        own_model.parse(table, job_dir)
    with pytest.raises(ConfigError, match=match):
        own_model.parse(table, job_dir)


def test_build_errors_name_the_layer_or_the_shape(job_dir):
    x = _calibration()
    with pytest.raises(ConfigError, match=r"\[model\] torch: no int8 TFLite twin .*\(Conv1d\) has no TFLite mapping"):
        own_model.build(own_model.parse({"torch": "model.py:make", "input_shape": [1, 32], "classes": 3}, job_dir),
                        x, runtime="litert")
    with pytest.raises(ConfigError, match=r"does not run or export on input_shape \[1, 40\]"):
        own_model.build(own_model.parse({"torch": "model.py:make", "input_shape": [1, 40], "classes": 3}, job_dir), x)
    with pytest.raises(ConfigError, match="must return a torch nn.Module, got int"):
        own_model.build(own_model.parse({"torch": "model.py:not_a_module", "input_shape": [32], "classes": 3},
                                        job_dir), x)
