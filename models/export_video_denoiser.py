"""Export the trained conditional video denoiser so a device can sample with it through its runtime.

- `export_onnx(state, path) -> Path`: the whole model as one ONNX graph (torch.onnx.export, TorchScript
  exporter, opset 17): inputs `x_t` (N, 8, 16, 16) float32, `t` (N,) int64, `cond` (N,) int64 (digit * 4 +
  direction); outputs `eps` (the noise prediction eps_theta) and `x0` (the clean-clip estimate x0_hat), both
  (N, 8, 16, 16) float32. The time embedding, the one-hot conditions, the schedule and the fixed skip are in
  the graph; N is dynamic.
- `check_onnx(state, path)`: runs the file on onnxruntime against the numpy model
  (`fedfleet.edge_agent.nn.video_denoiser.predict`, `predict_x0`) on seeded inputs; ModelError past the tolerance;
  returns the largest differences.
- `check_onnx_file(path) -> (hidden, session)`: opens a denoiser file and checks its inputs and outputs
  (names, element types, shapes); a clear ModelError when it is not this model.
- `export_tflite_core(state) -> bytes` and `check_tflite_core(state, blob)`: LiteRT gets the MLP core only,
  network input (N, 2094) -> x0 residual (N, 2048), FULLY_CONNECTED layers written by `fedfleet.models.head_graph`'s
  writer with the trained tensors fed as graph inputs. The project's TFLite writer has no SIN/COS, GATHER or
  the per-sample skip arithmetic, so the time embedding, the one-hot conditions and
  x0_hat = MEAN + c_skip(t) (x_t - sqrt(ab_t) MEAN) + residual stay in numpy on the device
  (`video_denoiser.network_input`, `c_skip`).
- `save_npz(state, path)` / `load_npz(path)`: the layout tensors (`fc{i}.weight`, `fc{i}.bias`) as an npz;
  loading checks every shape against the denoiser's layout for the hidden widths the file implies.

`python -m fedfleet.models.export_video_denoiser RUN_DIR/denoiser.npz --out DIR` writes and checks both files.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np

from fedfleet.edge_agent.errors import ModelError
from fedfleet.edge_agent.nn import mlp
from fedfleet.edge_agent.nn import video_denoiser as vd

INPUTS = ("x_t", "t", "cond")
OUTPUTS = ("eps", "x0")
CLIP = [vd.FRAMES, vd.SIZE, vd.SIZE]
OPSET = 17
# float32 rounding: x0 within 1e-4; eps divides by sqrt(1 - ab_t) (0.01 at t = 0), so its tolerance is wider
ATOL_X0, ATOL_EPS = 1e-4, 1e-2


def hidden_of(state: dict[str, np.ndarray]) -> tuple[int, ...]:
    """The hidden widths a layout implies; ModelError unless it is a denoiser's layout."""
    n = sum(1 for k in state if k.endswith(".weight"))
    if n < 2:
        raise ModelError(f"a denoiser has at least 2 layers fc0 .. fc1, got tensors {sorted(state)}")
    try:
        hidden = tuple(int(np.shape(state[f"fc{i}.weight"])[0]) for i in range(n - 1))
    except KeyError as exc:
        raise ModelError(f"denoiser tensors {sorted(state)} lack {exc}") from None
    want = dict(mlp.layout(vd.sizes(hidden)))
    if set(state) != set(want):
        raise ModelError(f"denoiser tensors {sorted(state)} are not the layout {sorted(want)}")
    for name, shape in want.items():
        if tuple(np.shape(state[name])) != shape:
            raise ModelError(f"denoiser tensor {name!r} has shape {tuple(np.shape(state[name]))}, the layout for "
                             f"hidden {list(hidden)} needs {shape} (input {vd.INPUT_DIM}, output {vd.PIXELS})")
    return hidden


def save_npz(state: dict[str, np.ndarray], path: str | Path) -> Path:
    hidden_of(state)
    path = Path(path)
    with open(path, "wb") as fh:
        np.savez(fh, **{k: np.asarray(v, np.float32) for k, v in state.items()})
    return path


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """The denoiser tensors in an npz, checked against the layout (ModelError otherwise)."""
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            state = {k: np.asarray(z[k], np.float32) for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise ModelError(f"{path}: not a readable npz of denoiser tensors ({exc})") from None
    hidden_of(state)
    if not all(np.isfinite(v).all() for v in state.values()):
        raise ModelError(f"{path}: denoiser tensors hold non-finite values")
    return state


def _module(state: dict[str, np.ndarray]):  # noqa: ANN202 - a torch module, torch imported lazily
    import torch

    from fedfleet.models.mirrors.video_denoiser import VideoDenoiser

    class Both(torch.nn.Module):
        def __init__(self, inner: VideoDenoiser) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x0 = self.inner.predict_x0(x_t, t, cond)
            a = self.inner.alpha_bar[t].reshape(-1, 1, 1, 1)
            return (x_t - torch.sqrt(a) * x0) / torch.sqrt(1.0 - a), x0

    hidden_of(state)
    return Both(VideoDenoiser.from_state(state)).eval()


def export_onnx(state: dict[str, np.ndarray], path: str | Path) -> Path:
    """Write eps_theta and x0_hat of the denoiser `state` (layout names) as one ONNX file at `path`."""
    import torch

    model = _module({k: np.asarray(v, np.float32) for k, v in state.items()})
    n = 2
    example = (torch.zeros(n, *CLIP), torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64))
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, example, buf, input_names=list(INPUTS), output_names=list(OUTPUTS),
                          dynamic_axes={k: {0: "n"} for k in (*INPUTS, *OUTPUTS)}, opset_version=OPSET,
                          dynamo=False)
    path = Path(path)
    path.write_bytes(buf.getvalue())
    return path


def check_onnx_file(path: str | Path):  # noqa: ANN201 - (hidden widths, onnxruntime.InferenceSession)
    """Open a denoiser ONNX file; ModelError unless its inputs and outputs are this model's."""
    import onnxruntime as ort

    try:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for unreadable files
        raise ModelError(f"{path}: not a loadable ONNX model ({exc})") from None
    want_in = {"x_t": ("tensor(float)", CLIP), "t": ("tensor(int64)", []), "cond": ("tensor(int64)", [])}
    got_in = {i.name: (i.type, list(i.shape[1:])) for i in sess.get_inputs()}
    if got_in != want_in:
        raise ModelError(f"{path}: inputs {got_in} are not the denoiser's {want_in} (x_t (N, 8, 16, 16) float32, "
                         "t (N,) int64, cond (N,) int64)")
    got_out = {o.name: (o.type, list(o.shape[1:])) for o in sess.get_outputs()}
    want_out = {k: ("tensor(float)", CLIP) for k in OUTPUTS}
    if got_out != want_out:
        raise ModelError(f"{path}: outputs {got_out} are not the denoiser's {want_out}")
    return sess


def _probe(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *CLIP)).astype(np.float32)
    t = rng.integers(0, vd.STEPS, n).astype(np.int64)
    t[:2] = (0, vd.STEPS - 1)
    cond = rng.integers(0, vd.CLASSES * len(vd.DIRECTIONS), n).astype(np.int64)
    return x, t, cond


def check_onnx(state: dict[str, np.ndarray], path: str | Path, n: int = 16, seed: int = 0) -> dict[str, float]:
    """Max |onnxruntime - numpy| of eps and x0 on seeded inputs; ModelError past ATOL_EPS / ATOL_X0."""
    sess = check_onnx_file(path)
    x, t, cond = _probe(n, seed)
    eps, x0 = sess.run(list(OUTPUTS), {"x_t": x, "t": t, "cond": cond})
    err = {"eps": float(np.max(np.abs(eps - vd.predict(state, x, t, cond)))),
           "x0": float(np.max(np.abs(x0 - vd.predict_x0(state, x, t, cond))))}
    if err["x0"] > ATOL_X0 or err["eps"] > ATOL_EPS:
        raise ModelError(f"{path}: onnxruntime differs from the numpy denoiser by {err} (tolerance x0 {ATOL_X0}, "
                         f"eps {ATOL_EPS})")
    return err


def export_tflite_core(state: dict[str, np.ndarray]) -> bytes:
    """The MLP core (network input -> x0 residual) as TFLite, its tensors as graph inputs (`head_graph`)."""
    from fedfleet.models.head_graph import tflite_head

    return tflite_head(vd.sizes(hidden_of(state)))


def check_tflite_core(state: dict[str, np.ndarray], blob: bytes, n: int = 16, seed: int = 0) -> dict[str, float]:
    """x0_hat computed with the core on LiteRT (embedding and skip in numpy) against numpy; ModelError past
    ATOL_X0. Returns the largest difference of x0."""
    from fedfleet.edge_agent.runtime import open_runner

    runner = open_runner(blob, runtime="litert", threads=1)
    x, t, cond = _probe(n, seed)
    feeds = {"features": vd.network_input(x, t, cond)}
    feeds.update({k: np.asarray(v, np.float32) for k, v in state.items()})
    residual = runner.run(feeds)[0]
    ab = vd.alpha_bar()
    a = ab[t].astype(np.float32).reshape(-1, 1)
    flat = x.reshape(n, -1)
    x0 = (vd.MEAN + vd.c_skip(t, ab) * (flat - np.sqrt(a) * vd.MEAN) + residual).reshape(x.shape)
    err = float(np.max(np.abs(x0 - vd.predict_x0(state, x, t, cond))))
    if err > ATOL_X0:
        raise ModelError(f"the TFLite core differs from the numpy denoiser by {err} (tolerance {ATOL_X0})")
    return {"x0": err}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Export a trained denoiser (npz) to ONNX and a TFLite core")
    ap.add_argument("npz")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    state = load_npz(args.npz)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    onnx_err = check_onnx(state, export_onnx(state, out / "denoiser.onnx"))
    core = export_tflite_core(state)
    (out / "denoiser_core.tflite").write_bytes(core)
    print({"onnx": onnx_err, "tflite_core": check_tflite_core(state, core)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
