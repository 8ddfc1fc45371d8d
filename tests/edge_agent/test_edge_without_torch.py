"""The edge side imports and runs with torch unavailable (as on a device with only the `edge` extra)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np

from fedfleet.coordinator.job.config import JobConfig
from tests.support.fleet import package

BLOCK_TORCH = """
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed on this device")
sys.meta_path.insert(0, _NoTorch())
for m in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
    del sys.modules[m]
"""


def test_edge_agent_imports_and_learns_without_torch(tmp_path):
    for mode in ("full", "transfer"):
        blob, _ = package(JobConfig(mode=mode))
        (tmp_path / f"{mode}.pkg").write_bytes(blob)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((40, 64), dtype=np.float32), y=rng.integers(0, 10, 40))
    code = BLOCK_TORCH + textwrap.dedent(f"""
        import importlib, pkgutil
        try:
            import torch  # noqa: F401
            raise SystemExit("torch import was not blocked")
        except ImportError:
            pass
        import fedfleet.edge_agent as edge_agent
        skipped = []
        for m in pkgutil.walk_packages(edge_agent.__path__, "fedfleet.edge_agent."):
            if m.name == "fedfleet.edge_agent.runtime.litert":
                continue  # optional extra
            importlib.import_module(m.name)
        from fedfleet.edge_agent.data import load_npz
        from fedfleet.edge_agent.learners import Task, create
        from fedfleet.edge_agent.model import EdgeModel
        data = load_npz({str(tmp_path / 'd.npz')!r})
        for mode in ("full", "transfer"):
            model = EdgeModel.from_bytes(open({str(tmp_path)!r} + "/" + mode + ".pkg", "rb").read())
            task = Task(run="r", round=1, method="fedavg", config={{"lr": 0.1}}, tensors=model.head_init)
            res = create("fedavg").learn(task, data, model)
            assert res.samples == 40 and set(res.tensors) == set(model.head_init)
        assert "torch" not in sys.modules
        print("edge-ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "edge-ok" in r.stdout, r.stdout + r.stderr


def test_embedded_broker_smoke():
    import threading

    from fedfleet.coordinator.broker import start_broker
    from fedfleet.edge_agent.wire.mqtt import MqttLink

    with start_broker("embedded") as b:
        got = threading.Event()
        link = MqttLink(b.url, client_id="smoke", on_message=lambda t, p: got.set(), subscriptions=["s/#"])
        link.start()
        link.publish("s/x", b"hello")
        assert got.wait(5)
        assert link.bytes_sent > 5 and link.bytes_received > 5
        link.stop()
