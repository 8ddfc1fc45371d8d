"""Model package: round trip, digest, every bad-package case, and edge/coordinator agreement."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch

from fedfleet.edge_agent.errors import ModelError
from fedfleet.edge_agent.model import EdgeModel
from fedfleet.edge_agent.nn import mlp
from fedfleet.edge_agent.wire.protocol import digest
from fedfleet.models import data as fdata
from fedfleet.models.mirrors.head import CoordinatorModel
from fedfleet.models.package import BackboneFile, build_package, central_head_accuracy, write_zip


@pytest.fixture(scope="module")
def blobs() -> dict[str, bytes]:
    return {mode: build_package(mode) for mode in ("transfer", "full")}


@pytest.fixture(scope="module")
def digits_split() -> tuple[fdata.Dataset, fdata.Dataset]:
    return fdata.split(fdata.digits(), 0.2, seed=0)


def members(blob: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def with_manifest(blob: bytes, **changes: object) -> bytes:
    m = members(blob)
    manifest = json.loads(m["manifest.json"])
    manifest.update(changes)
    m["manifest.json"] = json.dumps(manifest).encode()
    return write_zip(m)


# --- round trip and digest -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["transfer", "full"])
def test_round_trip(blobs: dict[str, bytes], mode: str) -> None:
    model = EdgeModel.from_bytes(blobs[mode], expected_digest=digest(blobs[mode]))
    assert model.mode == mode
    assert model.input_shape == (64,)
    assert model.head_sizes == [64, 32, 10]
    assert model.head_layout == mlp.layout([64, 32, 10])
    want = mlp.init([64, 32, 10], 0)
    assert set(model.head_init) == set(want)
    for k, v in want.items():
        assert model.head_init[k].dtype == np.float32
        np.testing.assert_array_equal(model.head_init[k], v)
    assert (model.backbone is None) == (mode == "full")
    if mode == "transfer":
        assert model.manifest["backbone"]["format"] == "onnx"
        assert "backbone.onnx" in members(blobs[mode])


def test_digest_is_deterministic_and_seed_sensitive(blobs: dict[str, bytes]) -> None:
    again = build_package("transfer")
    assert again == blobs["transfer"]
    assert digest(again) == digest(blobs["transfer"])
    assert digest(build_package("transfer", seed=1)) != digest(blobs["transfer"])
    assert len(digest(again)) == 64


def test_digest_mismatch_is_refused(blobs: dict[str, bytes]) -> None:
    with pytest.raises(ModelError, match="digest"):
        EdgeModel.from_bytes(blobs["full"], expected_digest=digest(blobs["transfer"]))


# --- bad packages ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [0, 1, 100, -22, -1])
def test_truncated_package(blobs: dict[str, bytes], cut: int) -> None:
    blob = blobs["transfer"]
    bad = blob[:cut] if cut >= 0 else blob[:cut]
    with pytest.raises(ModelError):
        EdgeModel.from_bytes(bad)


def test_garbage_and_wrong_type() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ModelError, match="zip"):
        EdgeModel.from_bytes(rng.bytes(4096))
    with pytest.raises(ModelError):
        EdgeModel.from_bytes("not bytes")  # type: ignore[arg-type]


def test_bit_flip_anywhere_is_caught(blobs: dict[str, bytes]) -> None:
    blob = bytearray(blobs["transfer"])
    rng = np.random.default_rng(1)
    for pos in rng.choice(len(blob), size=12, replace=False):
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        try:
            EdgeModel.from_bytes(bytes(bad))
        except ModelError:
            continue
        # a flip in zip padding/metadata that changes nothing checked may load: it must then be identical
        assert EdgeModel.from_bytes(bytes(bad)).manifest == EdgeModel.from_bytes(bytes(blob)).manifest


def test_backbone_sha_mismatch(blobs: dict[str, bytes]) -> None:
    m = members(blobs["transfer"])
    bb = bytearray(m["backbone.onnx"])
    bb[len(bb) // 2] ^= 0xFF
    m["backbone.onnx"] = bytes(bb)
    with pytest.raises(ModelError, match="sha256"):
        EdgeModel.from_bytes(write_zip(m))


def test_corrupt_backbone_with_matching_sha(blobs: dict[str, bytes]) -> None:
    import hashlib

    m = members(blobs["transfer"])
    bb = m["backbone.onnx"][: len(m["backbone.onnx"]) // 3]
    m["backbone.onnx"] = bb
    manifest = json.loads(m["manifest.json"])
    manifest["backbone"]["sha256"] = hashlib.sha256(bb).hexdigest()
    m["manifest.json"] = json.dumps(manifest).encode()
    with pytest.raises(ModelError, match="corrupt|truncated"):
        EdgeModel.from_bytes(write_zip(m))


def test_zip_bomb_refused_before_inflating(blobs: dict[str, bytes]) -> None:
    m = members(blobs["full"])
    m["padding.bin"] = bytes(8 << 20)  # deflates to a few KB, declares 8 MiB
    bomb = write_zip(m)
    assert len(bomb) < 100_000
    with pytest.raises(ModelError, match="zip bomb"):
        EdgeModel.from_bytes(bomb, max_bytes=1 << 20)


def test_oversized_blob(blobs: dict[str, bytes]) -> None:
    with pytest.raises(ModelError, match="cap"):
        EdgeModel.from_bytes(blobs["transfer"], max_bytes=1000)


def test_unexpected_member(blobs: dict[str, bytes]) -> None:
    m = members(blobs["full"])
    m["extra.txt"] = b"hello"
    with pytest.raises(ModelError, match="members"):
        EdgeModel.from_bytes(write_zip(m))


def test_missing_manifest(blobs: dict[str, bytes]) -> None:
    m = members(blobs["full"])
    del m["manifest.json"]
    with pytest.raises(ModelError, match="manifest"):
        EdgeModel.from_bytes(write_zip(m))


def test_manifest_not_json(blobs: dict[str, bytes]) -> None:
    m = members(blobs["full"])
    m["manifest.json"] = b"{not json"
    with pytest.raises(ModelError, match="JSON"):
        EdgeModel.from_bytes(write_zip(m))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"format_version": 99}, "format"),
        ({"mode": "lora"}, "mode"),
        ({"input_shape": [8, 8]}, "input shape|feature_dim"),
        ({"input_shape": [63]}, "input shape"),
        ({"feature_dim": 32}, "feature"),
        ({"head_sizes": [64, 16, 10]}, "inconsistent"),
        (
            {
                "head_layout": [
                    ["fc0.weight", [64, 32]],
                    ["fc0.bias", [32]],
                    ["fc1.weight", [10, 32]],
                    ["fc1.bias", [10]],
                ]
            },
            "inconsistent",
        ),
        ({"head_layout": "fc0"}, "head_layout"),
        ({"head_sizes": [64, -3, 10]}, "positive"),
        ({"classes": [0, 1, 2]}, "classes"),
    ],
)
def test_bad_manifest_transfer(blobs: dict[str, bytes], changes: dict[str, object], match: str) -> None:
    with pytest.raises(ModelError, match=match):
        EdgeModel.from_bytes(with_manifest(blobs["transfer"], **changes))


def test_bad_manifest_full_input_shape(blobs: dict[str, bytes]) -> None:
    with pytest.raises(ModelError, match="feature_dim"):
        EdgeModel.from_bytes(with_manifest(blobs["full"], input_shape=[32]))


def test_backbone_io_names_checked(blobs: dict[str, bytes]) -> None:
    manifest = json.loads(members(blobs["transfer"])["manifest.json"])
    manifest["backbone"]["input"] = "image"
    with pytest.raises(ModelError, match="inputs"):
        EdgeModel.from_bytes(with_manifest(blobs["transfer"], backbone=manifest["backbone"]))


def test_wrong_runtime_for_backbone() -> None:
    onnx_only = build_package("transfer", alternates=())
    with pytest.raises(ModelError, match="runtime"):
        EdgeModel.from_bytes(onnx_only, runtime="litert")


def test_default_transfer_package_runs_on_both_runtimes_with_agreeing_features(blobs: dict[str, bytes]) -> None:
    from fedfleet.models.data import digits

    x = digits().x[:300]
    ort = EdgeModel.from_bytes(blobs["transfer"], runtime="onnxruntime").features(x)
    lite = EdgeModel.from_bytes(blobs["transfer"], runtime="litert").features(x)
    assert ort.shape == lite.shape == (300, 64)
    # two int8 kernels of the same calibrated extractor: close, not identical
    rel = np.abs(ort - lite).mean() / np.abs(ort).mean()
    assert rel < 0.05, rel


def _with_head(blob: bytes, tensors: dict[str, np.ndarray]) -> bytes:
    m = members(blob)
    buf = io.BytesIO()
    np.savez(buf, **tensors)
    m["head_init.npz"] = buf.getvalue()
    return write_zip(m)


def test_head_init_wrong_shape_or_names_or_values(blobs: dict[str, bytes]) -> None:
    good = mlp.init([64, 32, 10], 0)
    wrong_shape = dict(good, **{"fc1.weight": np.zeros((10, 31), np.float32)})
    with pytest.raises(ModelError, match="shape"):
        EdgeModel.from_bytes(_with_head(blobs["full"], wrong_shape))
    missing = {k: v for k, v in good.items() if k != "fc1.bias"}
    with pytest.raises(ModelError, match="layout"):
        EdgeModel.from_bytes(_with_head(blobs["full"], missing))
    nonfinite = dict(good, **{"fc0.bias": np.full(32, np.nan, np.float32)})
    with pytest.raises(ModelError, match="finite"):
        EdgeModel.from_bytes(_with_head(blobs["full"], nonfinite))


def test_wrong_input_shape_at_run_time(blobs: dict[str, bytes]) -> None:
    model = EdgeModel.from_bytes(blobs["transfer"])
    with pytest.raises(ModelError, match="expects"):
        model.features(np.zeros((3, 65), np.float32))
    with pytest.raises(ModelError, match="expects"):
        model.features(np.zeros(64, np.float32))


# --- features, cache, and edge/coordinator agreement ----------------------------------------------


def test_features_cache_and_full_identity(blobs: dict[str, bytes], digits_split) -> None:
    _, test_set = digits_split
    model = EdgeModel.from_bytes(blobs["transfer"])
    f1 = model.features(test_set.x, "test")
    assert f1.shape == (len(test_set), 64) and f1.dtype == np.float32
    assert model.features(test_set.x, "test") is f1  # cached
    np.testing.assert_array_equal(model.features(test_set.x), f1)  # uncached recompute, batched the same
    other = model.features(test_set.x[:10] * 0.5, "test")  # same key, other data: recomputed, not stale
    assert other.shape == (10, 64) and not np.array_equal(other, f1[:10])
    full = EdgeModel.from_bytes(blobs["full"])
    np.testing.assert_array_equal(full.features(test_set.x), test_set.x)


@pytest.mark.parametrize("mode", ["transfer", "full"])
def test_edge_matches_coordinator(blobs: dict[str, bytes], digits_split, mode: str) -> None:
    train_set, test_set = digits_split
    edge = EdgeModel.from_bytes(blobs[mode])
    coord = CoordinatorModel(blobs[mode])
    head = {k: v.copy() for k, v in edge.head_init.items()}
    feats = edge.features(train_set.x, "train")
    for i in range(30):  # a few SGD steps so the head is not the init
        idx = slice(32 * i, 32 * i + 32)
        _, grads = mlp.loss_and_grad(head, feats[idx], train_set.y[idx])
        for k in head:
            head[k] -= 0.1 * grads[k]
    acc, loss = coord.evaluate({k: torch.from_numpy(v) for k, v in head.items()}, test_set.x, test_set.y)
    assert acc == pytest.approx(edge.accuracy(head, test_set.x, test_set.y), abs=1e-9)
    assert loss == pytest.approx(mlp.loss(head, edge.features(test_set.x), test_set.y), abs=1e-5)
    module = coord.load_head(head)
    assert list(module.state_dict()) == [name for name, _ in edge.head_layout]
    with torch.no_grad():
        torch_logits = module(torch.from_numpy(edge.features(test_set.x))).numpy()
    np.testing.assert_allclose(torch_logits, edge.logits(head, test_set.x), atol=1e-5)
    init = coord.initial_state()
    assert all(torch.equal(init[k], torch.from_numpy(edge.head_init[k])) for k in init)
    with pytest.raises(ModelError, match="layout"):
        coord.evaluate({"fc0.weight": init["fc0.weight"]}, test_set.x, test_set.y)


def test_transfer_backbone_is_useful() -> None:
    # central head training on frozen MNIST features must clearly beat chance on digits
    assert central_head_accuracy("transfer", epochs=10) >= 0.85


def test_backbone_alternates_are_checked_and_picked_by_runtime(blobs: dict[str, bytes]) -> None:
    fake_tflite = b"TFL3" + bytes(100)
    blob = build_package("transfer", alternates=[BackboneFile("tflite", fake_tflite)])
    model = EdgeModel.from_bytes(blob, runtime="onnxruntime")
    assert model.backbone_spec is not None and model.backbone_spec["format"] == "onnx"
    assert [a["format"] for a in model.manifest["backbone_alternates"]] == ["tflite"]
    np.testing.assert_array_equal(
        model.features(np.ones((2, 64), np.float32)),
        EdgeModel.from_bytes(blobs["transfer"]).features(np.ones((2, 64), np.float32)),
    )
    m = members(blob)
    m["backbone.0.tflite"] = b"TFL3" + bytes(99) + b"\x01"
    with pytest.raises(ModelError, match="sha256"):
        EdgeModel.from_bytes(write_zip(m))
    manifest = json.loads(m["manifest.json"])
    manifest["backbone_alternates"][0]["format"] = "coreml"
    with pytest.raises(ModelError, match="unknown"):
        EdgeModel.from_bytes(with_manifest(blob, backbone_alternates=manifest["backbone_alternates"]))


def test_edge_side_never_imports_torch(blobs: dict[str, bytes], tmp_path) -> None:
    import subprocess
    import sys

    path = tmp_path / "pkg.zip"
    path.write_bytes(blobs["transfer"])
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from fedfleet.edge_agent.model import EdgeModel\n"
        f"m = EdgeModel.from_bytes(open({str(path)!r}, 'rb').read())\n"
        "print(m.features(np.zeros((3, 64), np.float32)).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(3, 64)"


@pytest.mark.parametrize("runtime", ["onnxruntime", "litert"])
@pytest.mark.parametrize("mode", ["transfer", "full"])
def test_head_graph_with_tensors_as_inputs_matches_numpy(blobs: dict[str, bytes], runtime: str, mode: str) -> None:
    model = EdgeModel.from_bytes(blobs[mode], runtime=runtime)
    feats = model.features(fdata.digits().x[:200])
    head = {k: v + np.float32(0.01) * np.random.default_rng(1).normal(size=v.shape).astype(np.float32)
            for k, v in model.head_init.items()}
    np.testing.assert_allclose(model.head_logits(head, feats), mlp.forward(head, feats), atol=1e-5)


def test_tampered_head_graph_is_refused(blobs: dict[str, bytes]) -> None:
    m = members(blobs["full"])
    m["head.onnx"] = m["head.onnx"][:-4] + b"\x00\x00\x00\x00"
    with pytest.raises(ModelError, match="head graph"):
        EdgeModel.from_bytes(write_zip(m))
