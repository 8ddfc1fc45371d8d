"""`AgentConfig`: what one edge agent is told at start (broker, identity, keys, runtime, where it keeps state).

Re-exported by `fedfleet.edge_agent.agent`; the parts of the agent read it, none changes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class AgentConfig:
    broker: str
    fleet: str
    agent_id: str
    key: bytes  # this agent's HMAC key (uplink)
    runtime: str = "onnxruntime"
    threads: int = 1
    profile: str | None = None
    username: str | None = None
    password: str | None = None
    ca_certs: str | None = None
    coordinator_key: bytes | None = None  # the coordinator's pinned raw Ed25519 public key (signed downlink)
    state_dir: str | None = None  # kept across restarts: answered tasks, the package, error feedback
    extra_status: dict[str, Any] = field(default_factory=dict)
    max_skew_s: float = 300.0  # tolerated difference between this device's clock and the coordinator's
