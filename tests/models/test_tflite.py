"""The TFLite writer against its numpy reference, op by op, and the LiteRT runner's error handling."""

from __future__ import annotations

import numpy as np
import pytest

from fedfleet.edge_agent.errors import ModelError
from fedfleet.edge_agent.runtime import open_runner
from fedfleet.models import tflite_writer as tw

RNG = np.random.default_rng(7)


def _w(*shape: int) -> np.ndarray:
    return (RNG.normal(size=shape) * 0.3).astype(np.float32)


def _quant_input(x: np.ndarray, cal: list[tw.Range]) -> np.ndarray:
    s, zp = tw.act_q(*cal[0])
    return np.clip(np.round(x / s) + zp, -128, 127).astype(np.int8)


CASES = {
    "fully_connected": (tw.Graph((24,), [tw.Dense(_w(16, 24), _w(16))]), (200, 24)),
    "fully_connected_relu": (tw.Graph((24,), [tw.Dense(_w(16, 24), _w(16), relu=True)]), (200, 24)),
    "conv_same": (tw.Graph((1, 10, 10), [tw.Conv2D(_w(4, 1, 3, 3), _w(4))]), (40, 1, 10, 10)),
    "conv_valid_stride2_relu_3ch": (
        tw.Graph((3, 11, 11), [tw.Conv2D(_w(5, 3, 3, 3), _w(5), stride=2, padding="valid", relu=True)]),
        (40, 3, 11, 11),
    ),
    "conv_same_stride2": (tw.Graph((2, 9, 9), [tw.Conv2D(_w(4, 2, 3, 3), _w(4), stride=2)]), (40, 2, 9, 9)),
    "max_pool": (tw.Graph((3, 8, 8), [tw.MaxPool2D(2, 2)]), (40, 3, 8, 8)),
    "reshape_nhwc": (tw.Graph((2, 4, 4), [tw.Flatten(chw=False)]), (20, 2, 4, 4)),
    "transpose_flatten_chw": (tw.Graph((3, 4, 5), [tw.Flatten(chw=True)]), (20, 3, 4, 5)),
    "relu": (tw.Graph((16,), [tw.Relu()]), (200, 16)),
    "softmax": (tw.Graph((10,), [tw.Softmax()]), (200, 10)),
    "softmax_beta": (tw.Graph((10,), [tw.Softmax(beta=0.5)]), (200, 10)),
}


def _run(blob: bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return open_runner(blob, runtime="litert").run(feeds)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_op_matches_numpy(case: str) -> None:
    graph, shape = CASES[case]
    x = RNG.normal(size=shape).astype(np.float32)
    got = _run(tw.to_tflite(graph), {"x": x})
    want = tw.reference(graph, x)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_int8_op_matches_numpy(case: str) -> None:
    graph, shape = CASES[case]
    x = RNG.normal(size=shape).astype(np.float32)
    cal = tw.calibrate(graph, x)
    xq = _quant_input(x, cal)
    got = _run(tw.to_tflite(graph, cal, io="int8"), {"x": xq})
    want = tw.reference(graph, xq, cal, io="int8")
    assert got.dtype == np.int8 and got.shape == want.shape
    diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
    # the reference rounds like LiteRT's default CPU path; other kernels may round a tie the other way
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01
    # and the int8 result tracks the float graph within a few quantisation steps
    s, zp = [st.out_q for st in tw.lower(graph, cal, io="int8") if st.out_q][-1]
    real = (got.astype(np.float64) - zp) * s
    assert np.abs(real - tw.reference(graph, x)).max() <= 4 * s + 0.05 * np.abs(tw.reference(graph, x)).max()


def _cnn() -> tw.Graph:
    return tw.Graph(
        (1, 12, 12),
        [
            tw.Conv2D(_w(4, 1, 3, 3), _w(4), relu=True),
            tw.MaxPool2D(),
            tw.Conv2D(_w(6, 4, 3, 3), _w(6), relu=True),
            tw.MaxPool2D(),
            tw.Flatten(chw=True),
            tw.Dense(_w(10, 54), _w(10)),
        ],
    )


def test_int8_float_io_graph_has_quantize_and_dequantize() -> None:
    graph = _cnn()
    x = RNG.random((30, 1, 12, 12)).astype(np.float32)
    cal = tw.calibrate(graph, x)
    steps = tw.lower(graph, cal)
    assert steps[0].op == "QUANTIZE" and steps[-1].op == "DEQUANTIZE"
    blob = tw.to_tflite(graph, cal)
    got = _run(blob, {"x": x})
    s = steps[-2].out_q[0]
    assert got.dtype == np.float32
    assert np.abs(got - tw.reference(graph, x, cal)).max() <= 2 * s
    assert (got.argmax(1) == tw.reference(graph, x).argmax(1)).mean() >= 0.9
    assert len(blob) < len(tw.to_tflite(graph))  # int8 weights


def test_head_inputs_follow_the_fed_head() -> None:
    graph = _cnn()
    graph.head_inputs = True
    x = RNG.random((16, 1, 12, 12)).astype(np.float32)
    cal = tw.calibrate(graph, x)
    runner = open_runner(tw.to_tflite(graph, cal), runtime="litert")
    assert runner.input_names == ["x", "head.weight", "head.bias"]
    assert runner.input_shapes["head.weight"] == (10, 54)
    outs = []
    for _ in range(2):
        head = (_w(10, 54), _w(10))
        got = runner.run({"x": x, "head.weight": head[0], "head.bias": head[1]})[0]
        np.testing.assert_allclose(got, tw.reference(graph, x, cal, head=head), atol=1e-3)
        outs.append(got)
    assert np.abs(outs[0] - outs[1]).max() > 0.1


def test_runner_resizes_batch_and_reports_shapes() -> None:
    graph = CASES["fully_connected_relu"][0]
    runner = open_runner(tw.to_tflite(graph), runtime="litert", threads=2)
    assert runner.runtime == "litert" and runner.input_shapes == {"x": (None, 24)}
    assert runner.output_names == ["logits"]
    for n in (3, 64, 1, 3):
        x = RNG.normal(size=(n, 24)).astype(np.float32)
        np.testing.assert_allclose(runner.run({"x": x})[0], tw.reference(graph, x), atol=1e-5)


def test_bad_feeds_raise_model_error() -> None:
    graph = CASES["fully_connected"][0]
    runner = open_runner(tw.to_tflite(graph), runtime="litert")
    with pytest.raises(ModelError, match="missing"):
        runner.run({})
    with pytest.raises(ModelError, match="shape"):
        runner.run({"x": np.zeros((2, 23), np.float32)})
    with pytest.raises(ModelError, match="shape"):
        runner.run({"x": np.zeros((24,), np.float32)})
    with pytest.raises(ModelError, match="unknown"):
        runner.run({"x": np.zeros((2, 24), np.float32), "y": np.zeros(1)})
    cal = tw.calibrate(graph, RNG.normal(size=(10, 24)))
    int8_runner = open_runner(tw.to_tflite(graph, cal, io="int8"), runtime="litert")
    with pytest.raises(ModelError, match="int8"):
        int8_runner.run({"x": np.zeros((2, 24), np.float32)})


def test_corrupt_and_truncated_bytes_raise_model_error() -> None:
    graph = _cnn()
    blob = tw.to_tflite(graph, tw.calibrate(graph, RNG.random((8, 1, 12, 12))))
    bad = [b"", blob[:7], blob[:64], blob[: len(blob) // 2], blob[:-40], b"\x08\x00\x00\x00ONNX" + blob[8:]]
    flipped = bytearray(blob)
    flipped[0:4] = (len(blob) + 100).to_bytes(4, "little")
    bad.append(bytes(flipped))
    rng = np.random.default_rng(3)
    for _ in range(10):
        noisy = bytearray(blob)
        for pos in rng.integers(0, len(blob), size=16):
            noisy[int(pos)] = int(rng.integers(0, 256))
        bad.append(bytes(noisy))
    for b in bad[:-10]:
        with pytest.raises(ModelError):
            open_runner(b, runtime="litert")
    for b in bad[-10:]:  # random damage: refused at load, or (if it only hit weights) still runs
        try:
            open_runner(b, runtime="litert").run({"x": np.zeros((1, 1, 12, 12), np.float32)})
        except ModelError:
            pass


def test_lowering_refuses_inconsistent_graphs() -> None:
    with pytest.raises(ModelError, match="Dense"):
        tw.lower(tw.Graph((1, 4, 4), [tw.Dense(_w(2, 16), _w(2))]))
    with pytest.raises(ModelError, match="expects"):
        tw.lower(tw.Graph((8,), [tw.Dense(_w(2, 9), _w(2))]))
    with pytest.raises(ModelError, match="calibration"):
        tw.lower(tw.Graph((8,), [tw.Relu()]), [(0.0, 1.0)])
    with pytest.raises(ModelError, match="head"):
        tw.lower(tw.Graph((8,), [tw.Relu()], head_inputs=True))


def test_requantize_matches_float_rounding() -> None:
    m = RNG.uniform(1e-4, 0.9, size=64)
    q, shift = tw.quantize_multiplier(m)
    acc = RNG.integers(-(2**20), 2**20, size=(100, 64))
    got = tw.requantize(acc, q, shift)
    assert np.abs(got - acc * m).max() <= 0.5 + 1e-3  # the multiplier itself has 31 bits


def test_torch_mapping_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    from fedfleet.models.export_tflite import to_graph

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, stride=2),
        nn.Flatten(),
        nn.Linear(5 * 2 * 2, 6),
        nn.ReLU(),
        nn.Linear(6, 3),
    ).eval()
    x = RNG.random((12, 3, 10, 10)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    for head_inputs in (False, True):  # NHWC flatten with permuted columns, and CHW flatten with TRANSPOSE
        graph = to_graph(model, (3, 10, 10), head_inputs=head_inputs)
        head = (graph.layers[-1].weight, graph.layers[-1].bias) if head_inputs else None
        np.testing.assert_allclose(tw.reference(graph, x, head=head), want, atol=1e-5)
        feeds = {"x": x} if head is None else {"x": x, "head.weight": head[0], "head.bias": head[1]}
        np.testing.assert_allclose(_run(tw.to_tflite(graph), feeds), want, atol=1e-5)


def test_export_backbone_int8_features() -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    from fedfleet.models.export_tflite import export_backbone

    torch.manual_seed(1)
    extractor = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU()).eval()
    x = RNG.random((300, 16)).astype(np.float32)
    blob = export_backbone(extractor, (16,), x, input_name="pixels", output_name="features")
    runner = open_runner(blob, runtime="litert")
    assert runner.input_names == ["pixels"] and runner.output_names == ["features"]
    got = runner.run({"pixels": x})[0]
    with torch.no_grad():
        want = extractor(torch.from_numpy(x)).numpy()
    assert got.shape == (300, 8) and got.min() >= 0
    assert np.abs(got - want).max() <= 0.05 * want.max()
