"""`AgentConfig`: what one edge agent is told at start (broker, identity, keys, runtime, where it keeps state).

Re-exported by `fedfleet.edge_agent.agent`; the parts of the agent read it, none changes it. Every numeric
option is checked when it is made (a one-line `ConfigError` naming it): `threads` between 1 and
`max_threads()` (four per core, at least 4: more only makes the runtime spin up threads that wait for a core,
and a huge count made session creation hang while memory grew), `max_skew_s` a number of seconds in
[0, 86400).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from fedfleet.edge_agent.errors import ConfigError

THREADS_PER_CORE = 4


def max_threads() -> int:
    """The most threads an agent may ask its runtime for on this device."""
    return max(4, THREADS_PER_CORE * (os.cpu_count() or 1))


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

    def __post_init__(self) -> None:
        top = max_threads()
        if type(self.threads) is not int or not 1 <= self.threads <= top:
            raise ConfigError(f"threads must be an integer from 1 to {top} ({THREADS_PER_CORE} per core of this "
                              f"device), got {str(self.threads)[:40]}")
        skew = self.max_skew_s
        if isinstance(skew, bool) or not isinstance(skew, (int, float)) or not math.isfinite(skew) \
                or not 0 <= skew < 86400:
            raise ConfigError(f"max_skew_s must be a number of seconds in [0, 86400), got {str(skew)[:40]}")
