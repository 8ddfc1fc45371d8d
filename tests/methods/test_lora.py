"""Federated LoRA without a broker: the numpy adapter maths against torch autograd, the `lora` package checks,
the three strategies' aggregation rules, and the spec's synthetic check with its lambda sweep."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch

from fedfleet.coordinator.job.config import JobConfig
from fedfleet.coordinator.strategies import ClientResult, create, package_mode
from fedfleet.edge_agent.errors import ConfigError, ModelError
from fedfleet.edge_agent.learners import LocalData, Task
from fedfleet.edge_agent.learners import create as create_learner
from fedfleet.edge_agent.model import EdgeModel
from fedfleet.edge_agent.nn import lora as lora_mlp
from fedfleet.models import data as datasets
from fedfleet.models.lora_base import build_lora_package
from fedfleet.models.mirrors import lora
from fedfleet.models.mirrors.lora_model import LoraCoordinatorModel


@pytest.fixture(scope="module")
def blob() -> bytes:
    return build_lora_package("digits")


def _perturbed(model: EdgeModel, seed: int, merged: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in model.head_init.items()}
    if merged:
        p["fc0.merged"] = (0.05 * rng.standard_normal((64, 64))).astype(np.float32)
    return p


@pytest.mark.parametrize("merged", [False, True])
def test_numpy_lora_gradients_match_torch_autograd(blob, merged):
    model = EdgeModel.from_bytes(blob)
    params = _perturbed(model, 0, merged)
    rng = np.random.default_rng(1)
    x, y = rng.random((16, 64)).astype(np.float32), rng.integers(0, 10, 16)
    value, grads = lora_mlp.loss_and_grad(model.lora, params, x, y)
    torch_params = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    logits = LoraCoordinatorModel(blob).module(torch.from_numpy(x), torch_params)
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y))
    loss.backward()
    assert value == pytest.approx(float(loss.detach()), rel=1e-4)
    assert set(grads) == {n for n, _ in model.head_layout}  # the base and the merged residual are not trained
    for name, g in grads.items():
        np.testing.assert_allclose(g, torch_params[name].grad.numpy(), rtol=1e-4, atol=1e-6)
    assert np.abs(grads["fc0.lora_A"]).max() > 0 and np.abs(grads["fc0.lora_B"]).max() > 0


def test_lora_gradient_formulas_are_the_spec_ones(blob):
    """G_B = s·δ(Ax)ᵀ and G_A = s·Bᵀδxᵀ for a single adapted layer, checked by central differences."""
    model = EdgeModel.from_bytes(blob)
    params = {k: v.astype(np.float64) for k, v in _perturbed(model, 2).items()}
    base = lora_mlp.LoraBase(model.lora.sizes, {k: v.astype(np.float64) for k, v in model.lora.weights.items()},
                             model.lora.adapted, model.lora.rank, model.lora.alpha)
    digits = datasets.digits()  # real inputs: no class probability so small that the loss's log epsilon shows
    x, y = digits.x[:8].astype(np.float64), digits.y[:8]
    _, grads = lora_mlp.loss_and_grad(base, params, x, y)
    for name in ("fc0.lora_A", "fc0.lora_B"):
        for idx in [(1, 3), (3, 2)]:
            up, down = {**params, name: params[name].copy()}, {**params, name: params[name].copy()}
            up[name][idx] += 1e-6
            down[name][idx] -= 1e-6
            numeric = (lora_mlp.loss_and_grad(base, up, x, y)[0] - lora_mlp.loss_and_grad(base, down, x, y)[0]) / 2e-6
            assert grads[name][idx] == pytest.approx(numeric, rel=1e-3, abs=1e-7)


def test_package_ships_the_frozen_base_with_its_digest_and_the_coordinator_mirror_agrees(blob):
    model = EdgeModel.from_bytes(blob)
    assert model.mode == "lora" and model.lora.rank == 4 and model.lora.adapted == (0,)
    assert model.head_layout == [("fc0.lora_A", (4, 64)), ("fc0.lora_B", (64, 4)), ("fc1.weight", (10, 64)),
                                 ("fc1.bias", (10,))]
    assert not model.head_init["fc0.lora_B"].any()  # B starts at zero: round 0 is the pre-trained model
    np.testing.assert_array_equal(model.head_init["fc1.weight"], model.lora.weights["fc1.weight"])
    assert build_lora_package("digits") == blob  # deterministic
    params = _perturbed(model, 4, merged=True)
    x = np.random.default_rng(5).random((32, 64)).astype(np.float32)
    np.testing.assert_allclose(model.logits(params, x), LoraCoordinatorModel(blob).logits(params, x).numpy(),
                               rtol=1e-5, atol=1e-5)


def _replace_member(blob: bytes, member: str, data: bytes) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(blob))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, data if info.filename == member else src.read(info.filename))
    return out.getvalue()


def altered_base(blob: bytes) -> bytes:
    """The package with its base weights changed but the manifest's sha256 left as it was."""
    raw = zipfile.ZipFile(io.BytesIO(blob)).read("lora_base.npz")
    with np.load(io.BytesIO(raw)) as f:
        tensors = {k: f[k] for k in f.files}
    tensors["fc0.weight"] = tensors["fc0.weight"] + 0.01
    buf = io.BytesIO()
    np.savez(buf, **tensors)
    return _replace_member(blob, "lora_base.npz", buf.getvalue())


def test_a_base_that_does_not_match_its_manifest_is_refused(blob):
    with pytest.raises(ModelError, match="does not match its sha256"):
        EdgeModel.from_bytes(altered_base(blob))
    manifest = json.loads(zipfile.ZipFile(io.BytesIO(blob)).read("manifest.json"))
    manifest["lora"]["rank"] = 5  # layout and rank disagree
    with pytest.raises(ModelError, match="trainable layout"):
        EdgeModel.from_bytes(_replace_member(blob, "manifest.json", json.dumps(manifest).encode()))


def test_job_mode_follows_the_method_and_mismatches_are_config_errors():
    assert package_mode(JobConfig(method="lora_fair")) == "lora"
    assert package_mode(JobConfig(method="fedavg")) == "transfer"
    with pytest.raises(ConfigError, match="'mode'"):
        package_mode(JobConfig(method="fedavg", mode="lora"))
    with pytest.raises(ConfigError, match="'mode'"):
        package_mode(JobConfig(method="fedit", mode="full"))


def _results(state: dict[str, torch.Tensor], n: int = 3, seed: int = 0) -> list[ClientResult]:
    rng = np.random.default_rng(seed)
    return [ClientResult(f"a{k}", {name: (v.numpy() + 0.3 * rng.standard_normal(v.shape)).astype(np.float32)
                                   for name, v in state.items() if not name.endswith(".merged")}, 10 * (k + 1))
            for k in range(n)]


def _means(results: list[ClientResult], name: str) -> torch.Tensor:
    w = lora.client_weights([r.samples for r in results])
    return lora.weighted_mean([torch.from_numpy(r.tensors[name]) for r in results], w)


def test_fedit_averages_a_and_b_separately_and_records_the_gap(blob):
    cm = LoraCoordinatorModel(blob)
    s = create("fedit", cm.initial_state(), seed=0)
    results = _results(s.state)
    s.aggregate(1, 0, results)
    for name in s.state:
        torch.testing.assert_close(s.state[name], _means(results, name))
    assert 0 < s.history[0]["layers"]["fc0"]["cos_fedit"] < 1
    assert "fc0" in s.round_note()
    tasks = s.configure(2, 0, ["a0"])
    assert tasks["a0"].expect == cm.head_layout


def test_lora_fair_refines_b_only_and_lifts_the_cosine(blob):
    cm = LoraCoordinatorModel(blob)
    s = create("lora_fair", cm.initial_state(), seed=0, lam=0.01)
    results = _results(s.state)
    s.aggregate(1, 0, results)
    w = lora.client_weights([r.samples for r in results])
    a = [torch.from_numpy(r.tensors["fc0.lora_A"]) for r in results]
    b = [torch.from_numpy(r.tensors["fc0.lora_B"]) for r in results]
    target = lora.product_mean(a, b, w)
    torch.testing.assert_close(s.state["fc0.lora_A"], _means(results, "fc0.lora_A"))
    torch.testing.assert_close(s.state["fc1.weight"], _means(results, "fc1.weight"))
    delta_b = s.state["fc0.lora_B"] - _means(results, "fc0.lora_B")
    assert float(delta_b.norm()) > 0
    d = s.history[0]["layers"]["fc0"]
    assert d["cos_fair"] == pytest.approx(lora.cosine(s.state["fc0.lora_B"] @ s.state["fc0.lora_A"], target), abs=1e-6)
    assert d["cos_fair"] > d["cos_fedit"]
    assert d["delta_b_rel_norm"] == pytest.approx(float(delta_b.norm() / _means(results, "fc0.lora_B").norm()),
                                                  rel=1e-4)
    assert {"cos_fair", "cos_fedit", "delta_b_rel_norm", "p_over_t"} <= set(d)
    assert "|ΔB|/|B̄|" in s.round_note() and "|P|/|T|" in s.round_note()


def test_flora_merges_the_exact_average_product_and_reinitialises(blob):
    cm = LoraCoordinatorModel(blob)
    s = create("flora", cm.initial_state(), seed=0)
    assert s.configure(1, 0, ["a0"])["a0"].expect == cm.head_layout  # the merged residual is sent, not trained
    results = _results(s.state)
    s.aggregate(1, 0, results)
    w = lora.client_weights([r.samples for r in results])
    a = [torch.from_numpy(r.tensors["fc0.lora_A"]) for r in results]
    b = [torch.from_numpy(r.tensors["fc0.lora_B"]) for r in results]
    torch.testing.assert_close(s.state["fc0.merged"], lora.product_mean(a, b, w))
    assert not s.state["fc0.lora_B"].any()
    again = create("flora", cm.initial_state(), seed=0)
    again.aggregate(1, 0, results)
    assert torch.equal(again.state["fc0.lora_A"], s.state["fc0.lora_A"])  # the fresh A is seeded
    assert not torch.equal(s.state["fc0.lora_A"], cm.initial_state()["fc0.lora_A"])
    first = s.state["fc0.merged"].clone()
    results2 = _results(s.state, seed=1)
    s.aggregate(2, 0, results2)  # the residual accumulates round after round
    w2 = lora.client_weights([r.samples for r in results2])
    a2 = [torch.from_numpy(r.tensors["fc0.lora_A"]) for r in results2]
    b2 = [torch.from_numpy(r.tensors["fc0.lora_B"]) for r in results2]
    torch.testing.assert_close(s.state["fc0.merged"], first + lora.product_mean(a2, b2, w2))
    assert s.history[-1]["layers"]["fc0"]["merged_norm"] == pytest.approx(float(s.state["fc0.merged"].norm()))


def test_learner_trains_adapters_and_head_only(blob):
    model = EdgeModel.from_bytes(blob)
    rng = np.random.default_rng(0)
    data = LocalData(rng.random((64, 64)).astype(np.float32), rng.integers(0, 10, 64))
    task = Task("r", 1, "lora_fair", {"lr": 0.1, "epochs": 2, "batch": 16, "seed": 3}, dict(model.head_init))
    result = create_learner("lora_fair").learn(task, data, model)
    assert set(result.tensors) == {n for n, _ in model.head_layout} and result.samples == 64
    assert np.abs(result.tensors["fc0.lora_B"]).max() > 0  # B moved off zero
    assert all(np.array_equal(v, EdgeModel.from_bytes(blob).lora.weights[k]) for k, v in model.lora.weights.items())
    for name in ("fedit", "flora"):
        assert create_learner(name).name == name
    with pytest.raises(ModelError, match="mode 'lora'"):
        create_learner("fedit").learn(task, data, object())


def test_synthetic_check_lifts_the_cosine_to_099_and_the_lambda_sweep_shows_the_trade_off():
    """The spec's check: 6 factor pairs, r = 4, d = 32 (see `fedfleet.models.mirrors.lora.synthetic_factors`)."""
    for seed in range(3):
        r = lora.synthetic_check(seed, lam=0.01)
        assert r.cos_fair >= 0.99 and r.cos_fair > r.cos_fedit + 0.05, r
    sweep = [r if lam == 0.01 else lora.synthetic_check(2, lam=lam) for lam in (0.0, 0.01, 0.1, 1.0)]
    norms = [s.delta_b_rel_norm for s in sweep]
    cosines = [s.cos_fair for s in sweep]
    assert norms == sorted(norms, reverse=True), norms  # a stronger ridge keeps ΔB smaller ...
    assert all(c1 <= c0 + 1e-4 for c0, c1 in zip(cosines, cosines[1:])), cosines  # ... and the fit looser
    assert cosines[-1] < cosines[0] - 0.005, cosines
    # ΔB starts from zero: no iterations leave B̄ as it is
    a, b = lora.synthetic_factors(0)
    w = lora.client_weights([1] * 6)
    none = lora.refine_delta_b(lora.weighted_mean(a, w), lora.weighted_mean(b, w), lora.product_mean(a, b, w),
                               iterations=0)
    assert float(none.delta_b.norm()) == 0 and none.cos_fair == pytest.approx(none.cos_fedit)


def test_cosine_refinement_agrees_with_the_l2_closed_form_direction():
    a, b = lora.synthetic_factors(1)
    w = lora.client_weights([1] * 6)
    a_bar, b_bar, target = lora.weighted_mean(a, w), lora.weighted_mean(b, w), lora.product_mean(a, b, w)
    closed = lora.closed_form_delta_b(a_bar, b_bar, target, lam=1e-6)
    best = lora.cosine((b_bar + closed) @ a_bar, target)  # the best any B can do over Ā's row space
    fair = lora.refine_delta_b(a_bar, b_bar, target)
    assert fair.cos_fair == pytest.approx(best, abs=2e-3) and best > fair.cos_fedit


def test_lora_learner_runs_without_torch(blob, tmp_path):
    import subprocess
    import sys
    import textwrap

    from tests.edge_agent.test_edge_without_torch import BLOCK_TORCH

    (tmp_path / "lora.pkg").write_bytes(blob)
    code = BLOCK_TORCH + textwrap.dedent(f"""
        import numpy as np
        from fedfleet.edge_agent.learners import LocalData, Task, create
        from fedfleet.edge_agent.model import EdgeModel
        model = EdgeModel.from_bytes(open({str(tmp_path / 'lora.pkg')!r}, "rb").read())
        rng = np.random.default_rng(0)
        data = LocalData(rng.random((40, 64), dtype=np.float32), rng.integers(0, 10, 40))
        res = create("lora_fair").learn(Task("r", 1, "lora_fair", {{"lr": 0.1}}, dict(model.head_init)), data, model)
        assert set(res.tensors) == set(model.head_init) and "torch" not in sys.modules
        print("lora-edge-ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "lora-edge-ok" in r.stdout, r.stdout + r.stderr


def test_mnist_layout_adapts_every_hidden_layer_and_pools_do_not_leak():
    from fedfleet.models import shifts

    assert lora_mlp.trainable_layout([784, 256, 256, 10], [0, 1], 4) == [
        ("fc0.lora_A", (4, 784)), ("fc0.lora_B", (256, 4)), ("fc1.lora_A", (4, 256)), ("fc1.lora_B", (256, 4)),
        ("fc2.weight", (10, 256)), ("fc2.bias", (10,))]
    pre, fine = shifts.lora_pool("mnist", "pretrain"), shifts.lora_pool("mnist", "finetune")
    assert len(pre) + len(fine) == 5000
    pre_rows = {row.tobytes() for row in pre.x}
    assert sum(row.tobytes() in pre_rows for row in fine.x) < 5  # (the MNIST 5k file has a few duplicates)


def test_feature_shifts_are_the_six_domains():
    from fedfleet.models import shifts

    x = np.random.default_rng(0).random((5, 64)).astype(np.float32)
    img = x.reshape(5, 8, 8)
    np.testing.assert_array_equal(shifts.flip(x).reshape(5, 8, 8), img[:, :, ::-1])
    np.testing.assert_allclose(shifts.inversion(x), 1 - x)
    np.testing.assert_array_equal(shifts.shift(x).reshape(5, 8, 8)[:, :, 1:], img[:, :, :-1])
    assert np.all(shifts.shift(x).reshape(5, 8, 8)[:, :, 0] == 0)
    noisy = shifts.noise(x, 1)
    assert noisy.min() >= 0 and noisy.max() <= 1 and np.array_equal(noisy, shifts.noise(x, 1))
    np.testing.assert_allclose(shifts.blur(x).reshape(5, 8, 8)[:, 3, 3], img[:, 2:5, 2:5].mean(axis=(1, 2)), rtol=1e-6)
    parts, test, domains = shifts.shifted_shards("digits", 6, 0.0, 0)
    assert domains == list(shifts.SHIFT_NAMES) and len(test) == 6 * (len(test) // 6)
