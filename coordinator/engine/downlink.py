"""The coordinator's side of the compressed downlink: the reconstruction agents hold, and what to send each.

`DownlinkSync` keeps R_v (bit for bit what every synchronised agent holds, see `fedfleet.edge_agent.downlink`), the
FedZip codes of the last versions, and each agent's last confirmed version. Once per round `advance(G)`
codes `G - R` (FedZip), and R moves by the decoded code; what the code dropped stays in `G - R` and is sent
in a later round. `sync_for(agent)` is the payload that brings one agent to the current version: the chain
of codes since its version, or the full state when that is smaller, or when the agent's version is unknown
(it joined late, missed a round's answer, or its replica did not match).

Every round, `round_sync()` is published once on the fleet's broadcast topic (the coordinator's egress is
one copy per round, not one per agent); the task of an agent the broadcast serves names the state's digest
and carries no tensors, the task of any other agent carries its own sync.

An agent's version is confirmed when it returns a valid result for a task that carried the sync (it checked
the state digest before learning). An agent that does not answer is unconfirmed and gets a full state next.

`saved()` / `restore()` carry R and its version through a checkpoint, so a resumed run codes the next change
against the same reconstruction and its agents learn from the same state as without the interruption; after
a restore every agent is unconfirmed and gets that state in full once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedfleet.edge_agent import fedzip
from fedfleet.edge_agent.downlink import FULL_CODEC, MAX_CHAIN, apply_delta, fedzip_spec, state_digest
from fedfleet.edge_agent.wire import codecs


class DownlinkSync:
    def __init__(self, spec: Mapping[str, Any]) -> None:
        """`spec`: the downlink codec. FedZip codes the changes; "none" or "zstd" sends every version as a
        full, lossless state (then R is G exactly)."""
        self.spec = fedzip_spec(spec)
        self.lossy = self.spec.get("name") == "fedzip"
        self.params = (fedzip.FedZipParams.from_dict({k: v for k, v in self.spec.items() if k != "name"})
                       if self.lossy else None)
        self.version = 0
        self.layout: codecs.Layout = []
        self.state: dict[str, np.ndarray] = {}
        self.digest = ""
        self._codes: OrderedDict[int, bytes] = OrderedDict()  # version -> code from version - 1
        self._full: bytes = b""
        self._confirmed: dict[str, int] = {}

    def advance(self, global_state: Mapping[str, np.ndarray]) -> None:
        """A new version from the coordinator's global state G (called once per round, before dispatch)."""
        g = {k: np.asarray(v, np.float32) for k, v in global_state.items()}
        if not self.state or not self.lossy:
            self.layout = [(k, tuple(v.shape)) for k, v in g.items()]
            self.state = {k: v.copy() for k, v in g.items()}
        else:
            residual = {k: g[k] - self.state[k] for k in self.state}
            code = fedzip.encode(residual, self.params)
            # what the agents will decode, by the agents' own decoder: the two sides cannot drift apart
            sent = fedzip.decode(code, self.layout, self.params, max_bytes=1 << 30)
            self.state = apply_delta(self.state, sent)
            self._codes[self.version + 1] = code
        self.version += 1
        self.digest = state_digest(self.state, self.layout)
        self._full = codecs.encode(self.state, self.layout, FULL_CODEC)
        budget = len(self._full)  # codes older than a full state's worth are never worth sending
        while self._codes and (len(self._codes) > MAX_CHAIN or sum(map(len, self._codes.values())) > budget):
            self._codes.popitem(last=False)

    def saved(self) -> dict[str, Any]:
        """R and its version, for a checkpoint (tensors as float32 torch-free numpy arrays)."""
        return {"version": self.version, "state": {k: v.copy() for k, v in self.state.items()}}

    def restore(self, saved: Mapping[str, Any]) -> None:
        """Continue from a checkpoint's `saved()`: R and its version; no codes, no confirmed agents."""
        self.state = {k: np.array(v, dtype=np.float32, copy=True) for k, v in saved["state"].items()}
        self.layout = [(k, tuple(v.shape)) for k, v in self.state.items()]
        self.version = int(saved["version"])
        self.digest = state_digest(self.state, self.layout) if self.state else ""
        self._full = codecs.encode(self.state, self.layout, FULL_CODEC) if self.state else b""
        self._codes.clear()
        self._confirmed.clear()

    def sync_for(self, agent: str) -> tuple[dict[str, Any], bytes]:
        """(sync metadata, payload) that brings `agent` to the current version."""
        base = self._confirmed.get(agent)
        if base is not None and base < self.version and all(v in self._codes for v in range(base + 1, self.version + 1)):
            codes = [self._codes[v] for v in range(base + 1, self.version + 1)]
            if sum(map(len, codes)) < len(self._full):
                return ({"mode": "chain", "version": self.version, "base": base, "digest": self.digest,
                         "lens": [len(c) for c in codes]}, b"".join(codes))
        return {"mode": "full", "version": self.version, "base": None, "digest": self.digest, "lens": []}, self._full

    def round_sync(self) -> tuple[dict[str, Any], bytes]:
        """What every agent synchronised at the previous version needs: the round's one code (or the full
        state when there is none), published once per round on the broadcast topic."""
        if self.version in self._codes:
            code = self._codes[self.version]
            return ({"mode": "chain", "version": self.version, "base": self.version - 1, "digest": self.digest,
                     "lens": [len(code)]}, code)
        return {"mode": "full", "version": self.version, "base": None, "digest": self.digest, "lens": []}, self._full

    def serves(self, agent: str, broadcast: Mapping[str, Any]) -> bool:
        """True when the round's broadcast brings `agent` to the current version."""
        return broadcast["mode"] == "full" or self._confirmed.get(agent) == broadcast["base"]

    def tensors(self) -> dict[str, np.ndarray]:
        """R at the current version (what the agents learn from)."""
        return {k: v.copy() for k, v in self.state.items()}

    def confirm(self, agent: str, version: int) -> None:
        self._confirmed[agent] = version

    def forget(self, agent: str) -> None:
        """The agent's replica is unknown (it did not answer): it gets a full state next time."""
        self._confirmed.pop(agent, None)
