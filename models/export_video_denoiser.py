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
- No LiteRT file: the project's TFLite writer (`fedfleet.models.head_graph`) writes FULLY_CONNECTED layers
  only, and the denoiser is convolutional; a device samples through ONNX Runtime.
- `save_npz(state, path)` / `load_npz(path)`: the layout tensors (`video_denoiser.layout`) as an npz;
  loading checks every shape against the denoiser's layout for the hidden widths the file implies.

`python -m fedfleet.models.export_video_denoiser RUN_DIR/denoiser.npz --out DIR` writes and checks the ONNX file.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np

from fedfleet.edge_agent.errors import ModelError
from fedfleet.edge_agent.nn import video_denoiser as vd

INPUTS = ("x_t", "t", "cond")
OUTPUTS = ("eps", "x0")
CLIP = [vd.FRAMES, vd.SIZE, vd.SIZE]
OPSET = 17
# float32 rounding: x0 within 1e-4; eps divides by sqrt(1 - ab_t) (0.01 at t = 0), so its tolerance is wider
ATOL_X0, ATOL_EPS = 1e-4, 1e-2


def hidden_of(state: dict[str, np.ndarray]) -> tuple[int, ...]:
    """The block widths a layout implies; ModelError unless it is a denoiser's layout."""
    try:
        hidden = vd.hidden_of(state)
    except (KeyError, ValueError) as exc:
        raise ModelError(f"denoiser tensors {sorted(state)[:8]} are not a video denoiser's ({exc})") from None
    want = dict(vd.layout(hidden))
    if set(state) != set(want):
        raise ModelError(f"denoiser tensors {sorted(state)} are not the layout {sorted(want)}")
    for name, shape in want.items():
        if tuple(np.shape(state[name])) != shape:
            raise ModelError(f"denoiser tensor {name!r} has shape {tuple(np.shape(state[name]))}, the layout for "
                             f"hidden {list(hidden)} needs {shape}")
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Export a trained denoiser (npz) to ONNX")
    ap.add_argument("npz")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    state = load_npz(args.npz)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print({"onnx": check_onnx(state, export_onnx(state, out / "denoiser.onnx"))})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
