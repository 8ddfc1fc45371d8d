"""The agent's FedZip uplink with error feedback sparsifies and quantises each update once, and what it
sends is exactly what the residual accounts for."""

from __future__ import annotations

import numpy as np

from fedfleet.edge_agent import fedzip
from fedfleet.edge_agent.agent import Agent, AgentConfig
from fedfleet.edge_agent.learners import LocalData
from fedfleet.edge_agent.wire import codecs

SPEC = {"name": "fedzip", "z": 0.05, "k": 3, "encoding": "e4", "error_feedback": True}


def test_feedback_upload_quantises_once_and_the_residual_is_what_was_not_sent(monkeypatch) -> None:
    agent = Agent(AgentConfig("mqtt://127.0.0.1:1", "fleet", "pi-01", b"k" * 32), LocalData(np.zeros((1, 1)), np.zeros(1)))
    rng = np.random.default_rng(0)
    layout = [("fc0.weight", (32, 64)), ("fc0.bias", (32,))]
    calls = []
    real = fedzip.container._sparsify_all

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fedzip.container, "_sparsify_all", counted)
    residual = {n: np.zeros(s, np.float32) for n, s in layout}
    for _ in range(3):
        update = {n: rng.normal(size=s).astype(np.float32) for n, s in layout}
        compensated = {n: update[n] + residual[n] for n, _ in layout}
        calls.clear()
        payload = agent._with_feedback("fedavg", update, SPEC)
        assert len(calls) == 1  # one top-z / k-means pass per upload (it was two)
        monkeypatch.setattr(fedzip.container, "_sparsify_all", real)
        assert payload == codecs.encode(compensated, layout, SPEC)  # the same bytes as before the change
        monkeypatch.setattr(fedzip.container, "_sparsify_all", counted)
        sent = codecs.decode(payload, layout, SPEC, max_bytes=1 << 20)
        residual = agent.state.feedback["fedavg"].residual
        for n, _ in layout:  # the coordinator decodes exactly what the residual says was sent
            np.testing.assert_allclose(sent[n] + residual[n], compensated[n], rtol=0, atol=1e-6)
