"""The compressed downlink: the agent's replica of the global state, and the sync payload that moves it.

Instead of the dense global tensors, a task (or a round's broadcast) can carry a *sync*: the change of the
global state since the agent's last synchronised version, FedZip-coded. The coordinator keeps the same
reconstruction R_v the agents hold and codes `G - R_v` each round, so what a lossy code drops stays in
`G - R` and goes out with a later delta (server-side error feedback, nothing lost over rounds).

Both sides rebuild R with exactly the same float32 arithmetic (`apply_delta`), so agents and coordinator
hold the same reconstruction bit for bit; `state_digest` names it, and every sync carries the digest of the
state it leads to, which the agent checks before learning from it.

A sync is one of:
- `full`: R_v itself, losslessly (zstd of the float32 tensors), for an agent that joined late or whose
  replica is unknown;
- `chain`: the FedZip codes of versions base+1 .. v, applied in order to the agent's R_base.
The coordinator sends whichever is smaller, and publishes each round's sync once on the broadcast topic
`broadcast/state` for every agent it serves; such an agent's task carries only a reference
(`{"mode": "broadcast", "version": v, "digest": hex}`). The task, signed for the agent, names the digest
of the state, so a state message is used only when it leads to exactly that state. Sync metadata (`meta.sync` of a task header):
`{"mode": "full"|"chain", "version": v, "base": b|None, "digest": hex, "lens": [bytes of each code]}`.

Agents of one process (an emulated or demo fleet) that apply the same sync bytes to the same replica object
get the same result: replicas given one `Transitions` (the agents of one `fedfleet.edge_agent.host.Host`)
remember the last few transitions (base tensors object, SHA-256 of the payload, layout, codec, sync metadata)
and hand the resulting tensors to the next agent instead of decoding again. Replica tensors are never changed
in place, so sharing them is safe; a replica without one (an agent alone on a device) decodes for itself.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedfleet.edge_agent.errors import ProtocolError
from fedfleet.edge_agent.wire import codecs

Tensors = dict[str, np.ndarray]
FULL_CODEC: dict[str, Any] = {"name": "zstd", "level": 3}
MAX_CHAIN = 64  # codes in one chain; past that a full state is smaller anyway


def state_digest(tensors: Mapping[str, np.ndarray], layout: codecs.Layout) -> str:
    """SHA-256 of the float32 little-endian tensors in layout order: the name of one reconstruction."""
    return hashlib.sha256(codecs.pack(dict(tensors), layout)).hexdigest()


def apply_delta(state: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Tensors:
    """R + D in float32, the one addition both sides use (so they agree bit for bit)."""
    return {k: np.add(np.asarray(state[k], np.float32), np.asarray(delta[k], np.float32), dtype=np.float32)
            for k in state}


def fedzip_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The FedZip codec spec of a downlink spec `{"name": "fedzip", "z": .., ...}` (error feedback is
    implicit in the reconstruction, so the flag is dropped)."""
    return {k: v for k, v in spec.items() if k != "error_feedback"}


def check_sync_meta(raw: Any, modes: tuple[str, ...] = ("full", "chain")) -> dict[str, Any]:
    """The sync metadata of a task or state header, type-checked; ProtocolError("malformed") otherwise.
    Mode `broadcast` (tasks only) means: the state is the round's broadcast with this version and digest."""
    if not isinstance(raw, dict) or raw.get("mode") not in modes:
        raise ProtocolError("malformed", f"sync must be a dict with mode in {modes}")
    if raw["mode"] == "broadcast":
        version, dig = raw.get("version"), raw.get("digest")
        if isinstance(version, bool) or not isinstance(version, int) or not 0 < version < 1 << 31 \
                or not isinstance(dig, str) or len(dig) != 64:
            raise ProtocolError("malformed", f"bad broadcast sync reference {str(raw)[:120]}")
        return raw
    version, base, dig, lens = raw.get("version"), raw.get("base"), raw.get("digest"), raw.get("lens", [])
    ok = (isinstance(version, int) and 0 < version < 1 << 31 and isinstance(dig, str) and len(dig) == 64
          and isinstance(lens, list) and len(lens) <= MAX_CHAIN
          and all(isinstance(n, int) and 0 <= n < 1 << 30 for n in lens))
    if raw["mode"] == "chain":
        ok = ok and isinstance(base, int) and 0 < base < version and len(lens) == version - base
    if not ok or isinstance(version, bool):
        raise ProtocolError("malformed", f"bad sync metadata {str(raw)[:120]}")
    return raw


class Transitions:
    """The newest `keep` replica transitions (sync applied to a base state -> resulting state) of the replicas
    that share this object."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = int(keep)
        self._kept: OrderedDict[tuple[Any, ...], tuple[Tensors | None, Tensors]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> tuple[Tensors | None, Tensors] | None:
        with self._lock:
            return self._kept.get(key)

    def put(self, key: tuple[Any, ...], base: Tensors | None, tensors: Tensors) -> None:
        with self._lock:
            self._kept[key] = (base, tensors)
            while len(self._kept) > self.keep:
                self._kept.popitem(last=False)


def _memo_key(run: str, sync: Mapping[str, Any], payload: bytes, layout: codecs.Layout,
              spec: Mapping[str, Any]) -> tuple[Any, ...]:
    return (run, json.dumps(sync, sort_keys=True), hashlib.sha256(payload).digest(),
            tuple((n, tuple(s)) for n, s in layout), json.dumps(dict(spec), sort_keys=True, default=str))


@dataclass
class Replica:
    """One agent's copy of the global state for one run: version v and the tensors R_v."""

    run: str = ""
    version: int = 0
    tensors: Tensors = field(default_factory=dict)
    transitions: Transitions | None = field(default=None, repr=False, compare=False)  # shared with other replicas

    def digest(self, layout: codecs.Layout) -> str:
        return state_digest(self.tensors, layout)

    def apply(self, run: str, sync: dict[str, Any], payload: bytes, layout: codecs.Layout,
              spec: Mapping[str, Any], *, max_bytes: int) -> Tensors:
        """Bring the replica to the sync's version and return R_v; ProtocolError("replica") when the sync
        does not start from what this replica holds or does not lead to the named state (the coordinator
        then sends a full state)."""
        sync = check_sync_meta(sync)
        key = _memo_key(run, sync, payload, layout, spec)
        base = None if sync["mode"] == "full" else self.tensors
        hit = self.transitions.get(key) if self.transitions is not None else None
        if hit is not None and hit[0] is base and (base is None or (run == self.run and sync["base"] == self.version)):
            self.run, self.version, self.tensors = run, int(sync["version"]), hit[1]
            return {k: v.copy() for k, v in hit[1].items()}
        if sync["mode"] == "full":
            tensors = codecs.decode(payload, layout, FULL_CODEC, max_bytes=max_bytes)
        else:
            if run != self.run or sync["base"] != self.version or not self.tensors:
                raise ProtocolError("replica", f"chain from version {sync['base']} of run {run!r}, this replica"
                                               f" holds {self.version} of {self.run!r}")
            if sum(sync["lens"]) != len(payload):
                raise ProtocolError("malformed", "sync code lengths do not add up to the payload")
            tensors, offset = self.tensors, 0
            for n in sync["lens"]:
                delta = codecs.decode(payload[offset : offset + n], layout, {"name": "fedzip", **fedzip_spec(spec)},
                                      max_bytes=max_bytes)
                tensors = apply_delta(tensors, delta)
                offset += n
        if state_digest(tensors, layout) != sync["digest"]:
            raise ProtocolError("replica", f"state after sync to version {sync['version']} has the wrong digest")
        self.run, self.version, self.tensors = run, int(sync["version"]), tensors
        if self.transitions is not None:
            self.transitions.put(key, base, tensors)
        return {k: v.copy() for k, v in tensors.items()}
