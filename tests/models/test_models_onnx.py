"""ONNX side of the model zoo: fp32 parity with torch, int8 agreement, head-as-inputs, runner errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedfleet.edge_agent.errors import ConfigError, ModelError
from fedfleet.edge_agent.runtime import open_runner
from fedfleet.models import export_onnx, zoo


@pytest.fixture(scope="session")
def zoo_models() -> dict[str, torch.nn.Module]:
    return {name: zoo.train(name, seed=0) for name in zoo.names()}


@pytest.fixture(scope="session")
def variants(zoo_models: dict[str, torch.nn.Module]) -> dict[str, dict[str, bytes]]:
    return {name: export_onnx.export_variants(name, model) for name, model in zoo_models.items()}


def head_feeds(name: str, model: torch.nn.Module) -> dict[str, np.ndarray]:
    sd = model.state_dict()
    weight, bias = zoo.get(name).head
    return {"head.weight": sd[weight].numpy(), "head.bias": sd[bias].numpy()}


def test_zoo_registry() -> None:
    assert zoo.names() == ["digits-mlp", "mnist-mlp", "mnist-cnn"]
    assert sum(p.numel() for p in zoo.get("mnist-mlp").build().parameters()) == 101_770
    with pytest.raises(ConfigError, match="unknown zoo model"):
        zoo.get("resnet")
    for name in zoo.names():
        entry = zoo.get(name)
        params = dict(entry.build().named_parameters())
        assert all(h in params for h in entry.head)


def test_training_is_seeded() -> None:
    a = zoo.train("digits-mlp", seed=3, epochs=1)
    b = zoo.train("digits-mlp", seed=3, epochs=1)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


@pytest.mark.parametrize("name", ["digits-mlp", "mnist-mlp", "mnist-cnn"])
def test_trained_models_learn(zoo_models, name: str) -> None:
    _, test_set = zoo.datasets(name)
    assert zoo.accuracy(zoo_models[name], test_set.x, test_set.y) > 0.9


@pytest.mark.parametrize("name", ["digits-mlp", "mnist-mlp", "mnist-cnn"])
def test_fp32_matches_torch(zoo_models, variants, name: str) -> None:
    _, test_set = zoo.datasets(name)
    runner = open_runner(variants[name]["onnx-fp32"], threads=2)
    assert runner.input_names == ["x"] and runner.output_names == ["logits"]
    assert runner.input_shapes["x"] == (None, *zoo.get(name).input_shape)
    for batch in (1, 7, len(test_set)):  # dynamic batch
        out = runner.run({"x": test_set.x[:batch]})[0]
        np.testing.assert_allclose(out, zoo.predict(zoo_models[name], test_set.x[:batch]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["digits-mlp", "mnist-mlp", "mnist-cnn"])
@pytest.mark.parametrize("variant", ["onnx-int8", "onnx-int8-headinputs"])
def test_int8_agrees_with_torch(zoo_models, variants, name: str, variant: str) -> None:
    _, test_set = zoo.datasets(name)
    feeds = {"x": test_set.x}
    if variant.endswith("headinputs"):
        feeds.update(head_feeds(name, zoo_models[name]))
    out = open_runner(variants[name][variant]).run(feeds)[0]
    ref = zoo.predict(zoo_models[name], test_set.x)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.99
    acc_int8 = (out.argmax(1) == test_set.y).mean()
    acc_fp32 = (ref.argmax(1) == test_set.y).mean()
    assert acc_int8 >= acc_fp32 - 0.01


def test_int8_is_really_int8(variants) -> None:
    import onnx

    for name in zoo.names():
        graph = onnx.load_from_string(variants[name]["onnx-int8"]).graph
        ops = {n.op_type for n in graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        int8_inits = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
        assert int8_inits, name
    ratio = len(variants["mnist-mlp"]["onnx-int8"]) / len(variants["mnist-mlp"]["onnx-fp32"])
    assert ratio <= 0.35


@pytest.mark.parametrize("name", ["digits-mlp", "mnist-mlp", "mnist-cnn"])
def test_head_as_inputs_equals_baked(zoo_models, variants, name: str) -> None:
    _, test_set = zoo.datasets(name)
    x = test_set.x[:64]
    runner = open_runner(variants[name]["onnx-int8-headinputs"])
    weight, bias = zoo.get(name).head
    head = head_feeds(name, zoo_models[name])
    assert runner.input_names == ["x", "head.weight", "head.bias"]
    assert runner.input_shapes["head.weight"] == tuple(head["head.weight"].shape)
    out = runner.run({"x": x, **head})[0]
    baked = open_runner(variants[name]["onnx-int8-headfp32"]).run({"x": x})[0]
    np.testing.assert_allclose(out, baked, atol=1e-4, rtol=0)
    # the head really is an input: the logits are affine in (weight, bias)
    shift = np.arange(head["head.bias"].size, dtype=np.float32)
    moved = runner.run({"x": x, "head.weight": head["head.weight"], "head.bias": head["head.bias"] + shift})[
        0
    ]
    np.testing.assert_allclose(moved - out, np.broadcast_to(shift, out.shape), atol=1e-4)
    doubled = runner.run(
        {"x": x, "head.weight": 2 * head["head.weight"], "head.bias": 2 * head["head.bias"]}
    )[0]
    np.testing.assert_allclose(doubled, 2 * out, atol=1e-4, rtol=1e-5)
    del weight, bias


def test_export_all_writes_three_files(zoo_models, tmp_path: Path) -> None:
    paths = export_onnx.export_all("digits-mlp", tmp_path, zoo_models["digits-mlp"])
    assert list(paths) == list(export_onnx.VARIANTS)
    for variant, path in paths.items():
        assert path.exists() and path.name == f"digits-mlp.{variant}.onnx"
        assert open_runner(path).input_names[0] == "x"


def test_head_as_inputs_rejects_unknown_tensor(variants) -> None:
    with pytest.raises(ModelError, match="not an initializer"):
        export_onnx.head_as_inputs(variants["digits-mlp"]["onnx-fp32"], ["nope.weight", "nope.bias"])


# --- runner errors --------------------------------------------------------------------------------


def test_corrupt_and_truncated_model_bytes(variants) -> None:
    blob = variants["digits-mlp"]["onnx-int8"]
    rng = np.random.default_rng(0)
    for bad in (b"", blob[: len(blob) // 2], blob[:10], rng.bytes(len(blob)), b"\x08" * 64):
        with pytest.raises(ModelError, match="ONNX model"):
            open_runner(bad)
    with pytest.raises(ModelError, match="threads"):
        open_runner(blob, threads=0)


def test_bad_feeds_are_refused_before_ort(variants) -> None:
    runner = open_runner(variants["digits-mlp"]["onnx-int8-headinputs"])
    x = np.zeros((4, 64), np.float32)
    w, b = np.zeros((10, 32), np.float32), np.zeros(10, np.float32)
    with pytest.raises(ModelError, match="missing.*head.bias"):
        runner.run({"x": x, "head.weight": w})
    with pytest.raises(ModelError, match="unknown.*bogus"):
        runner.run({"x": x, "head.weight": w, "head.bias": b, "bogus": b})
    with pytest.raises(ModelError, match="'x' has shape"):
        runner.run({"x": np.zeros((4, 63), np.float32), "head.weight": w, "head.bias": b})
    with pytest.raises(ModelError, match="'x' has shape"):
        runner.run({"x": np.zeros(64, np.float32), "head.weight": w, "head.bias": b})
    with pytest.raises(ModelError, match="'head.weight' has shape"):
        runner.run({"x": x, "head.weight": w.T, "head.bias": b})
    # float64 input is cast, not refused
    out = runner.run({"x": x.astype(np.float64), "head.weight": w, "head.bias": b})[0]
    assert out.shape == (4, 10) and out.dtype == np.float32
