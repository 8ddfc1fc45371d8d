"""The moving-digits diffusion task: config checks, the "diffusion" package, local Adam, the conv denoiser's
numpy gradients against torch autograd, the ONNX export, and the fleet training the denoiser end to end over a
real Mosquitto at tiny size."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedfleet.coordinator import strategies
from fedfleet.coordinator.job import config
from fedfleet.coordinator.job.run import run_demo
from fedfleet.coordinator.tasks import diffusion as task
from fedfleet.edge_agent.errors import ConfigError, ModelError
from fedfleet.edge_agent.learners import Task, create
from fedfleet.edge_agent.model import EdgeModel
from fedfleet.edge_agent.nn import optimizers
from fedfleet.edge_agent.nn import video_denoiser as vd
from fedfleet.models import export_video_denoiser as ex
from fedfleet.models.diffusion_package import build_diffusion_package
from fedfleet.models.package import write_zip

TINY = (32,)
DIFF = config.DIFFUSION_TASK


def _cfg(**kw) -> config.JobConfig:
    return config.JobConfig(task=DIFF, **kw)


@pytest.mark.parametrize(("fields", "needle"), [
    ({"method": "fedzo"}, "field 'method'"),
    ({"mode": "full"}, "field 'mode'"),
    ({"mode": "lora"}, "field 'mode'"),
    ({"dataset": "mnist"}, "field 'dataset'"),
])
def test_the_task_refuses_fields_that_do_not_apply(fields, needle):
    with pytest.raises(ConfigError, match=needle):
        config.check_task(_cfg(**fields))


def test_task_fields_are_checked_and_only_apply_to_the_task():
    with pytest.raises(ConfigError, match="field 'task'"):
        config.apply(config.JobConfig(), {"task": "text-to-video"}, "x")
    with pytest.raises(ConfigError, match="field 'eval_every'"):
        config.apply(config.JobConfig(), {"eval_every": -1}, "x")
    with pytest.raises(ConfigError, match="field 'eval_every'"):
        config.check_task(config.JobConfig(eval_every=3))
    with pytest.raises(ConfigError, match="field 'mode'"):
        config.check_task(config.JobConfig(mode="diffusion"))
    with pytest.raises(ConfigError, match="field 'optimizer'"):
        strategies.check_method("fedavg", {"optimizer": "lion"}, "[method]")
    with pytest.raises(ConfigError, match="field 'hidden_layers' = 5"):
        config.check_task(_cfg(hidden=8, hidden_layers=5))
    assert task.hidden_of(config.check_task(_cfg(hidden=8, hidden_layers=4))) == (8, 8, 8, 8)
    cfg = _cfg()
    assert strategies.package_mode(cfg) == "diffusion"
    mc = strategies.method_config(cfg)
    assert (mc["optimizer"], mc["lr"], mc["batch"], mc["uplink"]["name"]) == ("adam", 2e-4, 64, "fedzip")
    assert "optimizer" not in strategies.method_config(config.JobConfig())  # classification keeps plain SGD


def test_job_file_and_command_line_errors_are_one_line(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(f'[job]\ntask = "{DIFF}"\nmethod = "fedzo"\n')
    with pytest.raises(ConfigError, match="field 'method'"):
        config.load(job)
    job.write_text(f'[job]\ntask = "{DIFF}"\neval_every = 2\nhidden = 16\nrounds = 3\n')
    cfg = config.load(job)
    assert (cfg.task, cfg.eval_every, task.hidden_of(cfg)) == (DIFF, 2, (16,))
    shipped = config.load(Path(__file__).parents[2] / "examples" / "moving-digits-diffusion.toml")
    assert task.hidden_of(shipped) == task.DEFAULT_HIDDEN and strategies.method_config(shipped)["optimizer"] == "adam"
    r = subprocess.run([sys.executable, "-m", "fedfleet.coordinator.cli", "demo", "--broker", "mqtt://127.0.0.1:1",
                        "--task", DIFF, "--mode", "full", "--run-dir", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=120)
    err = r.stderr.strip()
    assert r.returncode == 2 and "\n" not in err and "Traceback" not in err and "field 'mode'" in err, err
    assert not (tmp_path / "run").exists()


def test_shards_skew_digit_classes_and_carry_condition_ids():
    parts, test = task.shards(_cfg(agents=5, alpha=0.3))
    assert sum(len(p) for p in parts) == 1438 * task.REPEATS and len(test) == 359
    for p in parts:
        assert p.x.shape[1:] == (vd.FRAMES, vd.SIZE, vd.SIZE) and p.y.max() < 40
    top_share = [np.bincount(p.y // 4, minlength=10).max() / len(p) for p in parts]
    assert max(top_share) > 0.3  # Dirichlet(0.3) over digits: some agent is dominated by one digit
    iid, _ = task.shards(_cfg(agents=5, alpha=0.0))
    assert max(np.bincount(p.y // 4, minlength=10).max() / len(p) for p in iid) < 0.2


def _manifest_blob(blob: bytes, edit) -> bytes:  # noqa: ANN001
    with zipfile.ZipFile(__import__("io").BytesIO(blob)) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    manifest = json.loads(members["manifest.json"])
    edit(manifest)
    members["manifest.json"] = json.dumps(manifest).encode()
    return write_zip(members)


def test_the_diffusion_package_loads_and_bad_manifests_are_refused():
    blob = build_diffusion_package(TINY, seed=3)
    model = EdgeModel.from_bytes(blob)
    assert model.mode == "diffusion" and model.head_sizes == vd.sizes(TINY)
    assert model.manifest["diffusion"]["hidden"] == [32] and model.manifest["objective"] == "denoising"
    out = f"conv{len(vd.plan(TINY)) - 1}.weight"
    np.testing.assert_array_equal(model.head_init[out], 0.0)  # starts as the linear estimate
    assert [n for n, _ in model.head_layout] == [n for n, _ in vd.layout(TINY)]
    edits = {
        "frames": lambda m: m["diffusion"].update(frames=4),
        "steps": lambda m: m["diffusion"].update(steps="many"),
        "objective": lambda m: m.update(objective="classification"),
        "hidden": lambda m: m["diffusion"].update(hidden=[64]),
        "diffusion.hidden": lambda m: m["diffusion"].update(hidden=[8] * 5),
        "architecture": lambda m: m["diffusion"].update(architecture="mlp"),
        "head_layout": lambda m: m.update(head_layout=m["head_layout"][:-1]),
    }
    for key, edit in edits.items():
        with pytest.raises(ModelError, match=key):
            EdgeModel.from_bytes(_manifest_blob(blob, edit))


def test_adam_follows_kingma_and_ba():
    """Against the paper's algorithm written out in float64 (torch.optim's first step imports its compiler
    stack, seconds of a test's time)."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((3, 4))
    p = {"w": w0.astype(np.float32)}
    opt = optimizers.Adam(0.01, weight_decay=0.1)
    w, m, v = w0.copy(), np.zeros_like(w0), np.zeros_like(w0)
    for step in range(1, 6):
        g = rng.standard_normal((3, 4)).astype(np.float32)
        opt.step(p, {"w": g})
        g64 = g + 0.1 * w
        m = 0.9 * m + 0.1 * g64
        v = 0.999 * v + 0.001 * g64**2
        w = w - 0.01 * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)
    np.testing.assert_allclose(p["w"], w, rtol=1e-5, atol=1e-6)
    assert isinstance(optimizers.create({"optimizer": "adam"}), optimizers.Adam)
    with pytest.raises(ConfigError, match="optimizer"):
        optimizers.create({"optimizer": "lion"})


def test_the_fedavg_learner_trains_the_denoising_objective_with_local_adam():
    model = EdgeModel.from_bytes(build_diffusion_package(TINY, seed=0))
    parts, test = task.shards(_cfg(agents=2, alpha=0.0))
    state = {k: v.copy() for k, v in model.head_init.items()}
    before = task.score(state, test.x, test.y)["denoise_loss"]
    learner = create("fedavg")
    for r in range(3):
        t = Task("run", r + 1, "fedavg", {"lr": 1e-3, "epochs": 1, "batch": 64, "optimizer": "adam", "seed": 5},
                 state)
        res = learner.learn(t, parts[0], model)
        assert set(res.tensors) == set(state) and res.samples == len(parts[0])
        state = {k: state[k] + res.tensors[k] for k in state}
    assert task.score(state, test.x, test.y)["denoise_loss"] < before - 0.002  # fixed draws: no scoring noise


def test_numpy_gradients_and_input_vjp_agree_with_torch_autograd():
    """The edge's hand-written backward pass (every tensor, and v^T dx0_hat/dx_t for guidance) against the
    torch mirror's autograd, through pooling, upsampling, skip concatenations, residual blocks and width changes."""
    import torch

    from fedfleet.models.mirrors.video_denoiser import VideoDenoiser

    hidden = (6, 5, 4)
    rng = np.random.default_rng(0)
    params = {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in vd.init(hidden, 1).items()}
    x0 = rng.uniform(-1, 1, (4, vd.FRAMES, vd.SIZE, vd.SIZE)).astype(np.float32)
    cond, t = np.array([0, 5, 17, 39]), np.array([0, 200, 600, 999])
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    ab = vd.alpha_bar()
    value, grads = vd.loss_at(params, x0, cond, t, eps, ab)
    model = VideoDenoiser.from_state(params)
    x_t = torch.from_numpy(vd.noised(x0, t, eps, ab))
    tt, cc = torch.from_numpy(t), torch.from_numpy(cond)
    loss = (((model.predict_x0(x_t, tt, cc) - torch.from_numpy(x0)) / model.c_out(tt)) ** 2).mean()
    loss.backward()
    assert value == pytest.approx(loss.item(), rel=1e-5)
    assert set(grads) == {n for n, _ in vd.layout(hidden)}
    for name, g in grads.items():
        np.testing.assert_allclose(g, model.p(name).grad.numpy(), rtol=1e-3, atol=1e-4 * np.abs(g).max(), err_msg=name)
    v = rng.standard_normal(x0.shape).astype(np.float32)
    xg = x_t.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(model.predict_x0(xg, tt, cc), xg, torch.from_numpy(v))
    x0_hat, got = vd.vjp_input(params, x_t.numpy(), t, cond, v)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
    np.testing.assert_allclose(x0_hat, model.predict_x0(x_t, tt, cc).detach().numpy(), atol=1e-4)


def test_onnx_export_matches_numpy_and_wrong_files_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    state = {k: v + 0.02 * rng.standard_normal(v.shape).astype(np.float32) for k, v in vd.init(TINY, 2).items()}
    path = ex.export_onnx(state, tmp_path / "d.onnx")
    err = ex.check_onnx(state, path)
    assert err["x0"] <= ex.ATOL_X0 and err["eps"] <= ex.ATOL_EPS
    other = {k: v + 0.5 for k, v in state.items()}  # a different model in the same file: the check fails
    with pytest.raises(ModelError, match="differs"):
        ex.check_onnx(other, path)
    from fedfleet.models.head_graph import onnx_head

    (tmp_path / "head.onnx").write_bytes(onnx_head([64, 10]))
    with pytest.raises(ModelError, match="inputs"):
        ex.check_onnx_file(tmp_path / "head.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelError, match="not a loadable"):
        ex.check_onnx_file(tmp_path / "junk.onnx")
    ex.save_npz(state, tmp_path / "d.npz")
    assert set(ex.load_npz(tmp_path / "d.npz")) == set(state)
    bad = dict(state, **{"cemb0.weight": np.zeros((100, 32), np.float32)})
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(ModelError, match="cemb0.weight"):
        ex.load_npz(tmp_path / "bad.npz")


def test_the_fleet_trains_the_denoiser_over_mosquitto(mosquitto, tmp_path):
    cfg = _cfg(rounds=4, agents=3, hidden=32, eval_every=2, deadline_s=300.0,
               method_config={"local_steps": 10, "batch": 32, "lr": 1e-3})
    result = run_demo(cfg, broker=mosquitto.url, run_dir=tmp_path, quiet=True, report="now")
    assert [s.ok for s in result.summaries] == [3] * 4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_accuracy"] is None and summary["task"] == DIFF and summary["quality_metric"] == "x0_mse"
    # the held-out denoising loss and the x0-prediction MSE fall from the untrained (linear-estimate) model: the
    # last global iterate's by more than the moving average's, which the run ships and which lags it
    assert summary["last_denoise_loss"] < summary["initial_denoise_loss"] - 0.001, summary
    assert summary["last_x0_mse"] < summary["initial_x0_mse"] - 0.001, summary
    assert summary["last_x0_mse"] < summary["final_x0_mse"] < summary["initial_x0_mse"], summary
    # evaluated on rounds 2 and 4 only; the ledger stores NULL for the others
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        scores = [r[0] for r in db.execute("SELECT accuracy FROM rounds ORDER BY round")]
    # (the score is the shipped moving average's)
    assert scores[0] is None and scores[2] is None and scores[3] == pytest.approx(summary["final_x0_mse"])
    evals = [json.loads(line) for line in (tmp_path / task.EVAL_FILE).read_text().splitlines()]
    assert [e["round"] for e in evals] == [2, 4] and set(evals[0]["x0_mse_by_t"]) == {str(t) for t in task.QUALITY_T}
    # FedZip uplink by default: far below a dense float32 delta per agent-round
    dense = sum(int(np.prod(s)) for _, s in EdgeModel.from_bytes(build_diffusion_package(TINY)).head_layout) * 4
    assert result.bytes_up < 4 * 3 * dense / 5
    # the run directory holds the moving average as npz and as a checked ONNX file, and the last global iterate;
    # the average sits between the start and the last iterate: decay 0.995^10 per round, 4 rounds
    assert summary["files"] == {"npz": task.NPZ_FILE, "onnx": task.ONNX_FILE, "last_npz": task.LAST_NPZ_FILE}
    state = ex.load_npz(tmp_path / task.NPZ_FILE)
    ex.check_onnx(state, tmp_path / task.ONNX_FILE)
    last = ex.load_npz(tmp_path / task.LAST_NPZ_FILE)
    start = EdgeModel.from_bytes(build_diffusion_package((32,), seed=cfg.seed)).head_init
    moved = {k: float(np.linalg.norm(state[k] - start[k])) / max(1e-12, float(np.linalg.norm(last[k] - start[k])))
             for k in start if np.any(last[k] != start[k])}
    d = 0.995 ** 10
    assert moved and all(0.05 < m < 0.6 for m in moved.values()), (1 - d ** 4, moved)
    assert "x0 MSE" in (tmp_path / "report" / "report.html").read_text()
