"""An agent's replica of what the coordinator holds: the model package in use and the synced global state.

`LocalReplica` owns the loaded package (`model`, its `digest`, or why the last one could not be used:
`error`), the global state as the compressed downlink rebuilt it (`sync`, a `downlink.Replica`) and the
round state broadcasts kept until a task names one. Packages are loaded under the Host's load lock and,
when the agent shares models, loaded once per digest into the shared dict (each agent gets its own
feature cache). Everything here runs on the agent's worker thread.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fedfleet.edge_agent.downlink import Replica, Transitions, check_sync_meta
from fedfleet.edge_agent.errors import ModelError, ProtocolError
from fedfleet.edge_agent.wire import codecs, protocol
from fedfleet.edge_agent.wire.shared_bytes import SharedBytes

KEEP_VERSIONS = 3  # state broadcast versions kept (the newest)
KEEP_CANDIDATES = 4  # state messages kept per version (only one leads to the state a task names)


class LocalReplica:
    """The package and the global state one agent holds."""

    def __init__(self, *, runtime: str, threads: int, load_lock: Any, payloads: SharedBytes,
                 shared_models: dict[str, Any] | None = None, transitions: Transitions | None = None) -> None:
        self.runtime, self.threads = runtime, threads
        self.load_lock = load_lock
        self.payloads = payloads
        self.shared_models = shared_models
        self.model: Any = None
        self.digest: str | None = None
        self.error: str | None = None
        self.sync = Replica(transitions=transitions)  # the global state as the compressed downlink rebuilt it
        self.states: dict[tuple[str, int], list[tuple[dict[str, Any], bytes]]] = {}  # (run, version) -> candidates

    # -------------------------------------------------------------- the package
    def load(self, blob: bytes, input_shape: tuple[int, ...]) -> Any:
        """The package in `blob`, loaded (or this Host's loaded copy); ModelError if it cannot be used with
        data of `input_shape`. Does not make it current: see `use`."""
        from fedfleet.edge_agent.model import EdgeModel

        with self.load_lock:
            model = self._shared(blob) if self.shared_models is not None else None
            if model is None:
                model = EdgeModel.from_bytes(blob, runtime=self.runtime, threads=self.threads)
                if self.shared_models is not None and self.runtime == "onnxruntime":
                    self.shared_models[model.digest] = model
                    model = dataclasses.replace(model, _cache={})
        if tuple(model.input_shape) != tuple(input_shape):
            raise ModelError(f"model input shape {model.input_shape} does not fit local data {input_shape}")
        return model

    def use(self, model: Any, digest: str) -> None:
        self.model, self.digest, self.error = model, digest, None

    def _shared(self, blob: bytes) -> Any:
        """This Host's loaded copy of `blob` with a fresh feature cache, or None if not loaded yet."""
        shared = (self.shared_models or {}).get(protocol.digest(blob))
        return None if shared is None else dataclasses.replace(shared, _cache={})

    # -------------------------------------------------------------- the global state
    def keep_state(self, header: dict[str, Any], body: bytes) -> None:
        """Keep a round's state broadcast until a task names it (a few candidates per version, the newest
        versions only: a task accepts only the one that leads to the state its signed header names)."""
        meta = header.get("meta")
        sync = check_sync_meta(meta.get("sync") if isinstance(meta, dict) else None)
        key = (str(header.get("run")), int(sync["version"]))
        candidates = self.states.setdefault(key, [])
        if len(candidates) < KEEP_CANDIDATES:
            candidates.append((header, self.payloads.shared(body)))  # one copy for the agents of this Host
        for old in sorted(self.states)[:-KEEP_VERSIONS]:
            del self.states[old]

    def tensors(self, run: str, sync: Any, body: bytes, layout: codecs.Layout, codec: Any, *,
                max_bytes: int) -> Any:
        """The task's tensors from the replica; None while the round's state broadcast is still arriving.
        ProtocolError when no sync leads to the state the task names."""
        if not isinstance(sync, dict) or sync.get("mode") != "broadcast":
            return self.sync.apply(run, sync, body, layout, codec, max_bytes=max_bytes)
        check_sync_meta(sync, ("broadcast",))
        if self.sync.run == run and self.sync.version == sync["version"]:
            if self.sync.digest(layout) == sync["digest"]:
                return {k: v.copy() for k, v in self.sync.tensors.items()}
        candidates = self.states.get((run, int(sync["version"])))
        if not candidates:
            return None
        for header, payload in candidates:
            state = (header.get("meta") or {}).get("sync")
            if not isinstance(state, dict) or state.get("digest") != sync["digest"]:
                continue  # not the state this signed task names
            return self.sync.apply(run, state, payload, layout, header.get("codec", codec), max_bytes=max_bytes)
        raise ProtocolError("replica", f"no state broadcast leads to version {sync['version']} named by the task")
