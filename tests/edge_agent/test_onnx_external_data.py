"""Model files are self-contained (issue item 8): an ONNX initializer stored as external data would be read
by ONNX Runtime relative to the working directory when a model is loaded from bytes; such models and the
packages that carry them are refused before a session is made."""

from __future__ import annotations

import hashlib
import io
import os
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fedfleet.edge_agent import package_reader
from fedfleet.edge_agent.errors import ModelError
from fedfleet.edge_agent.runtime import onnxruntime as ort_backend
from fedfleet.edge_agent.runtime.onnx_scan import external_tensors


def _model(external: str | None = None, *, nested: bool = False) -> bytes:
    w = numpy_helper.from_array(np.eye(2, dtype=np.float32), "W")
    if external is not None:
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for k, v in (("location", external), ("offset", "0"), ("length", "16")):
            entry = w.external_data.add()
            entry.key, entry.value = k, v
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    if nested:  # the tensor sits in an If node's branch, as a Constant's attribute
        branch = helper.make_graph([helper.make_node("Constant", [], ["c"], value=w)], "b", [],
                                   [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 2])])
        cond = numpy_helper.from_array(np.array(True), "cond")
        nodes = [helper.make_node("If", ["cond"], ["W"], then_branch=branch, else_branch=branch),
                 helper.make_node("MatMul", ["x", "W"], ["y"])]
        graph = helper.make_graph(nodes, "g", [x], [y], initializer=[cond])
    else:
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g", [x], [y], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def test_a_self_contained_model_loads():
    assert external_tensors(_model()) == []
    runner = ort_backend.open(_model())
    assert np.allclose(runner.run({"x": np.ones((1, 2), np.float32)})[0], 1.0)


@pytest.mark.parametrize("nested", [False, True])
def test_external_tensors_are_found_wherever_they_sit(nested):
    # nested: the tensor is in both branches of the If
    assert external_tensors(_model("weights.bin", nested=nested)) == ["W"] * (2 if nested else 1)


@pytest.mark.parametrize("nested", [False, True])
def test_a_model_with_external_data_is_refused_before_the_file_is_read(tmp_path, monkeypatch, nested):
    # what ORT 1.32 reads from the working directory for the nested variant (a Constant in an If branch),
    # and for a graph initializer when graph optimisations are off
    (tmp_path / "weights.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="external data: W") as err:
        ort_backend.open(_model("weights.bin", nested=nested))
    assert "\n" not in str(err.value) and "self-contained" in str(err.value)


def test_a_package_carrying_an_external_data_model_is_refused(tmp_path):
    raw = _model("etc/passwd")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("head.onnx", raw)
    spec = {"file": "head.onnx", "sha256": hashlib.sha256(raw).hexdigest(), "format": "onnx"}
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf, pytest.raises(ModelError, match="self-contained"):
        package_reader.head_graph_bytes(zf, spec, 1 << 20)
    backbone = {**spec, "input": "x", "output": "y"}
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf, pytest.raises(ModelError, match="external data: W"):
        package_reader.backbone_bytes(zf, backbone, 1 << 20)


def test_malformed_bytes_are_left_to_the_runtime_load():
    with pytest.raises(ValueError):
        external_tensors(b"\x0a\xff\xff\xff\xff\x0f")
    with pytest.raises(ModelError, match="corrupt, truncated or not ONNX"):
        ort_backend.open(b"\x0a\xff\xff\xff\xff\x0f")
    assert os.path.exists(onnx.__file__)
