"""Parity of every zoo model across torch, ONNX Runtime and LiteRT, in fp32 and int8.

fp32: torch, ONNX and TFLite logits agree within 1e-4. int8 (and the int8 head-as-inputs variants fed the
torch head): argmax agreement with torch fp32 >= 0.99 on the test split, on both runtimes.
Models are trained briefly (a few epochs, one torch thread) once per module.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ai_edge_litert")

from fedfleet.edge_agent.runtime import open_runner  # noqa: E402
from fedfleet.models import export_onnx, export_tflite, zoo  # noqa: E402

EPOCHS = {"digits-mlp": 10, "mnist-mlp": 2, "mnist-cnn": 2}
RUNTIME_OF = {"onnx": "onnxruntime", "tflite": "litert"}


@pytest.fixture(scope="module")
def exported() -> dict[str, dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models train faster on one thread, and the machine is shared
    try:
        out: dict[str, dict] = {}
        for name in zoo.names():
            model = zoo.train(name, seed=0, epochs=EPOCHS.get(name, 2))
            _, test_set = zoo.datasets(name)
            blobs = {**export_onnx.export_variants(name, model), **export_tflite.export_variants(name, model)}
            head = {k: model.state_dict()[k].numpy() for k in zoo.get(name).head}
            out[name] = {"model": model, "test": test_set, "blobs": blobs, "head": head}
        return out
    finally:
        torch.set_num_threads(threads)


def _logits(entry: dict, variant: str, threads: int = 1) -> np.ndarray:
    runner = open_runner(entry["blobs"][variant], runtime=RUNTIME_OF[variant.split("-")[0]], threads=threads)
    x = entry["test"].x
    feeds = {"x": x}
    if variant.endswith("headinputs"):
        weight, bias = entry["head"].values()
        feeds.update({"head.weight": weight, "head.bias": bias})
    (out,) = runner.run(feeds)
    assert out.shape == (len(x), 10) and out.dtype == np.float32
    return out


@pytest.mark.parametrize("name", zoo.names())
def test_fp32_torch_onnx_tflite_agree(exported: dict, name: str) -> None:
    entry = exported[name]
    want = zoo.predict(entry["model"], entry["test"].x)
    for variant in ("onnx-fp32", "tflite-fp32"):
        got = _logits(entry, variant, threads=2)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"{name} {variant}")


@pytest.mark.parametrize("name", zoo.names())
@pytest.mark.parametrize(
    "variant", ["onnx-int8", "tflite-int8", "onnx-int8-headinputs", "tflite-int8-headinputs"]
)
def test_int8_argmax_agrees_with_torch(exported: dict, name: str, variant: str) -> None:
    entry = exported[name]
    want = zoo.predict(entry["model"], entry["test"].x).argmax(axis=1)
    got = _logits(entry, variant).argmax(axis=1)
    agreement = float((got == want).mean())
    assert agreement >= 0.99, f"{name} {variant}: int8 argmax agreement {agreement:.4f} < 0.99"
    acc_fp32 = float((want == entry["test"].y).mean())
    acc_int8 = float((got == entry["test"].y).mean())
    assert acc_int8 >= acc_fp32 - 0.01, f"{name} {variant}: accuracy {acc_int8:.4f} vs fp32 {acc_fp32:.4f}"


@pytest.mark.parametrize("name", zoo.names())
def test_int8_runtimes_agree_with_each_other(exported: dict, name: str) -> None:
    """Both runtimes quantise with min/max calibration on the same samples: their int8 logits stay close."""
    entry = exported[name]
    for kind in ("int8", "int8-headinputs"):
        onnx_out = _logits(entry, f"onnx-{kind}")
        tfl_out = _logits(entry, f"tflite-{kind}")
        assert float((onnx_out.argmax(1) == tfl_out.argmax(1)).mean()) >= 0.99
        spread = float(np.abs(onnx_out).max())
        assert float(np.abs(onnx_out - tfl_out).mean()) <= 0.02 * spread


def test_int8_tflite_is_smaller(exported: dict) -> None:
    blobs = exported["mnist-mlp"]["blobs"]
    assert len(blobs["tflite-int8"]) <= 0.35 * len(blobs["tflite-fp32"])


def test_bench_runtimes_quick_smoke(tmp_path, capsys) -> None:
    import json

    from fedfleet.tools.bench import runtimes as bench_runtimes

    path = tmp_path / "runtimes.json"
    assert bench_runtimes.main(["--quick", "--seconds", "0.01", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert set(result) == {"models", "zo_calls_per_s"}
    keys = {
        "model",
        "runtime",
        "precision",
        "size_bytes",
        "latency_b1_us",
        "latency_b64_us",
        "agreement",
        "accuracy",
    }
    rows = {(m["model"], m["runtime"], m["precision"]): m for m in result["models"]}
    assert set(rows) == {("digits-mlp", rt, p) for rt in ("onnxruntime", "litert") for p in ("fp32", "int8")}
    for row in rows.values():
        assert set(row) == keys
        assert row["size_bytes"] > 1000 and row["latency_b1_us"] > 0 and row["latency_b64_us"] > 0
        assert 0.5 < row["accuracy"] <= 1 and row["agreement"] >= 0.95
    for rt in ("onnxruntime", "litert"):
        assert rows[("digits-mlp", rt, "fp32")]["agreement"] == 1.0
    assert set(result["zo_calls_per_s"]) == {"onnxruntime", "litert"}
    assert all(v > 0 for v in result["zo_calls_per_s"].values())
