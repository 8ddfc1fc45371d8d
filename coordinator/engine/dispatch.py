"""Downlink: building, signing and publishing what the coordinator sends, and counting its bytes.

- the model package, retained and chunked on `broadcast/model/<i>` (agents load it and announce its digest).
  Its header names the `run`, the time it was published (`sent`, this coordinator's clock) and `boot`, a
  random id of this coordinator process: an agent takes a package only if it is not older than the one it
  holds (a replayed package of an earlier run is refused), and answers a new `boot` with a fresh status
  that echoes it, which is what the coordinator takes as the truth about the agent
  (`fedfleet.coordinator.engine.receive`);
- a round's state, once on `broadcast/state`, for strategies whose tasks all carry the global state
  (`fedfleet.coordinator.engine.downlink.DownlinkSync`: a FedZip-coded change or the full state);
- each agent's task on its task topic.

Every downlink header is built here (`_header`), and every message is signed with the coordinator's Ed25519 key
seed. `bytes_down` counts the MQTT bytes of everything published. A task's `msg` id (agents tell a new dispatch
from a redelivered one by it) is this dispatcher's random prefix and a counter: unique per coordinator process
without a random draw per task.
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from fedfleet.coordinator.engine.downlink import DownlinkSync
from fedfleet.coordinator.strategies import TaskSpec
from fedfleet.edge_agent.wire import codecs, protocol

OLD_MODEL_CHUNKS = 8  # retained model chunks past the package's last one are cleared (a longer, older package)


class Publisher(Protocol):
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int: ...


class Dispatcher:
    def __init__(self, *, link: Publisher, fleet: str, run: str, method: str, signing_key: bytes, package: bytes,
                 ttl_s: float, downlink: dict[str, Any], sync: DownlinkSync | None, boot: str = "") -> None:
        """`ttl_s`: the deadline each task gives its agent; `downlink`: the task codec (`EngineConfig.downlink`);
        `sync`: the state sync of strategies whose tasks carry the global state, else None; `boot`: this
        coordinator process's id, in every package header."""
        self.link = link
        self.state_chunks: set[bytes] = set()  # SHA-256 of each chunk of the last state broadcast
        self.boot = boot
        self.fleet, self.run, self.method = fleet, run, method
        self._key = signing_key
        self.package, self.package_digest = package, protocol.digest(package)
        self.ttl_s = ttl_s
        self.downlink = downlink
        self.sync = sync
        self.bytes_down = 0
        self._broadcast: dict[str, Any] = {}  # the sync metadata of the round's state broadcast
        self._msg_prefix = secrets.token_hex(8)  # drawn once: a resumed coordinator's dispatches get new msg ids
        self._msg_count = itertools.count()

    def _msg_id(self) -> str:
        return f"{self._msg_prefix}-{next(self._msg_count):x}"

    def _header(self, kind: str, agent: str, **fields: Any) -> dict[str, Any]:
        """A downlink header: kind, fleet and addressee first, then `fields` in their order (the bytes depend on it)."""
        return {"kind": kind, "fleet": self.fleet, "agent": agent, **fields}

    def _send(self, topic: str | Callable[[int], str], header: dict[str, Any], payload: bytes, *,
              retain: bool = False) -> tuple[int, int]:
        """Sign and publish `payload` in chunks (`topic(i)` names chunk i's topic); returns (MQTT bytes, chunks)."""
        chunks = protocol.split_signed(header, payload, self._key)
        if header.get("kind") == "state":
            self.state_chunks = {hashlib.sha256(c).digest() for c in chunks}
        sent = sum(self.link.publish(topic(i) if callable(topic) else topic, c, retain=retain)
                   for i, c in enumerate(chunks))
        self.bytes_down += sent
        return sent, len(chunks)

    def publish_package(self, package: bytes | None = None) -> int:
        """Publish the model package (a new one if given) as retained, chunked broadcast messages; returns the MQTT
        bytes. Agents load it and announce its digest in their status."""
        if package is not None:
            self.package, self.package_digest = package, protocol.digest(package)
        sent = time.time()  # each publication is its own message: chunks of an older one never mix in
        header = self._header("model", "coordinator", msg=f"{self.package_digest[:16]}-{int(sent * 1e6):x}",
                              run=self.run, sent=sent, boot=self.boot)
        sent, n = self._send(lambda i: protocol.broadcast_topic(self.fleet, f"model/{i}"), header, self.package,
                             retain=True)
        for i in range(n, n + OLD_MODEL_CHUNKS):  # clear leftovers of a longer, older package (not counted)
            self.link.publish(protocol.broadcast_topic(self.fleet, f"model/{i}"), b"", retain=True)
        return sent

    def publish_state(self, r: int) -> int:
        """The round's sync, once on the broadcast topic; returns its MQTT bytes (what each agent it serves receives;
        the coordinator sends it once)."""
        if self.sync is None:
            raise RuntimeError("publish_state needs a state sync: the strategy's tasks do not carry the global state")
        meta, payload = self.sync.round_sync()
        self._broadcast = meta
        header = self._header("state", "coordinator", run=self.run, round=r, codec=self.sync.spec,
                              layout=[[n, list(s)] for n, s in self.sync.layout], meta={"sync": meta})
        return self._send(protocol.broadcast_topic(self.fleet, "state"), header, payload)[0]

    def dispatch(self, agent: str, r: int, phase: int, spec: TaskSpec, state_bytes: int = 0,
                 extra_meta: dict[str, Any] | None = None) -> int:
        """Publish one agent's task; returns the bytes it receives (its task, plus the round's state broadcast when
        the task refers to it). `extra_meta` joins the task's meta (asynchronous mode: the model `version`)."""
        layout = [(n, tuple(np.shape(t))) for n, t in spec.tensors.items()]
        sync, codec, received = None, self.downlink, 0
        if self.sync is not None and phase == 0:
            codec = self.sync.spec
            if self._broadcast and self.sync.serves(agent, self._broadcast):
                sync = {"mode": "broadcast", "version": self.sync.version, "digest": self.sync.digest}
                payload, received = b"", state_bytes
            else:
                sync, payload = self.sync.sync_for(agent)
        else:
            if codec.get("name") not in ("none", "zstd"):
                codec = {"name": "zstd"}  # tasks that are not a state sync go losslessly
            payload = codecs.encode(spec.tensors, layout, codec)
        header = self._header(
            "task", agent, run=self.run, round=r, phase=phase, method=self.method, codec=codec,
            layout=[[n, list(s)] for n, s in layout], sent=time.time(), ttl=self.ttl_s, model=self.package_digest,
            meta={"config": spec.config, "expect": [[n, list(s)] for n, s in spec.expect],
                  "uplink": spec.uplink_codec, **({"sync": sync} if sync is not None else {}), **(extra_meta or {})},
        )
        header["msg"] = self._msg_id()  # where `protocol.split_signed` would put its own (the field order is kept)
        return self._send(protocol.agent_topic(self.fleet, agent, "task"), header, payload)[0] + received
