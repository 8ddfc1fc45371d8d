"""The agent's downlink inbox: verify each message from the broker, reassemble it and route it to the worker.

Runs on the MQTT network thread, so it only checks and enqueues. A message counts only if it carries the
coordinator's signature under the pinned key, is signed for this fleet, and its kind fits its topic (a task
also names this agent); anything else is refused with a typed `ProtocolError` and counted by reason in
`refused`. Complete messages go to the worker as (kind, header, body): "task", "model" (only a package
other than the current one) or "state". A task's header is a `Received`: the signed header as it came,
plus the monotonic time this agent received it (its deadline counts from there).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from fedfleet.edge_agent.errors import ProtocolError
from fedfleet.edge_agent.wire import protocol
from fedfleet.edge_agent.wire.signing import VerifiedSignatures

log = logging.getLogger(__name__)

MAX_MODEL_BYTES = 64 << 20
MAX_TASK_BYTES = 256 << 20


class Received(dict[str, Any]):
    """A verified downlink header, exactly as signed, and `at`: when this agent received it (monotonic)."""

    def __init__(self, header: dict[str, Any], at: float) -> None:
        super().__init__(header)
        self.at = at


class Inbox:
    """Verifies, reassembles and routes the downlink of one agent."""

    def __init__(self, *, fleet: str, agent_id: str, coordinator_key: bytes | None,
                 deliver: Callable[[str, dict[str, Any], bytes], None], current_model: Callable[[], str | None],
                 signatures: VerifiedSignatures | None = None,
                 on_refused: Callable[[str, ProtocolError], None] | None = None) -> None:
        self.fleet, self.agent_id, self.coordinator_key = fleet, agent_id, coordinator_key
        self.on_refused = on_refused  # told of every refusal (the agent reports a bad package signature)
        self.deliver = deliver
        self.current_model = current_model
        self.signatures = signatures
        self.refused: dict[str, int] = {}  # refused downlink messages by reason
        self.task_topic = protocol.agent_topic(fleet, agent_id, "task")
        self.model_prefix = protocol.broadcast_topic(fleet, "model/")
        self.state_topic = protocol.broadcast_topic(fleet, "state")
        self._tasks = protocol.Reassembler(max_total=MAX_TASK_BYTES, max_pending=8)
        self._models = protocol.Reassembler(max_total=MAX_MODEL_BYTES, max_pending=4)
        self._states = protocol.Reassembler(max_total=MAX_TASK_BYTES, max_pending=4)

    def subscriptions(self) -> list[str]:
        return [self.task_topic, protocol.broadcast_topic(self.fleet, "model/#"), self.state_topic]

    def on_message(self, topic: str, payload: bytes) -> None:
        """The link's callback: route one message, or count why it was refused."""
        if not payload:
            return  # a cleared retained message
        if topic not in (self.task_topic, self.state_topic) and not topic.startswith(self.model_prefix):
            log.debug("agent %s ignores a message on %s (not subscribed)", self.agent_id, topic)
            return
        try:
            self._route(topic, payload)
        except ProtocolError as exc:
            n = self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
            if n <= 5 or n % 100 == 0:
                log.warning("agent %s refused a message on %s (%d so far for this reason): %s",
                            self.agent_id, topic, n, exc)
            if self.on_refused is not None:
                self.on_refused(topic, exc)

    def _route(self, topic: str, payload: bytes) -> None:
        if self.coordinator_key is None:
            raise ProtocolError("no_coordinator_key", "no coordinator key is pinned")
        header, body = protocol.open_signed(payload, self.coordinator_key, verified=self.signatures)
        if header.get("fleet") != self.fleet:
            raise ProtocolError("spoofed", "signed for another fleet")
        if topic == self.state_topic:
            if header.get("kind") != "state":
                raise ProtocolError("spoofed", f"a {str(header.get('kind'))[:16]!r} message on the state topic")
            done = self._states.add(header, body, sender="coordinator")
            if done is not None:
                self.deliver("state", done[0], done[1])
        elif topic.startswith(self.model_prefix):
            if header.get("kind") != "model":
                raise ProtocolError("spoofed", f"a {str(header.get('kind'))[:16]!r} message on a model topic")
            done = self._models.add(header, body, sender="coordinator")
            if done is not None and done[0].get("digest") != self.current_model():
                self.deliver("model", done[0], done[1])
        else:
            if header.get("agent") != self.agent_id or header.get("kind") != "task":
                raise ProtocolError("spoofed", "task addressed to another agent")
            done = self._tasks.add(header, body, sender="coordinator")
            if done is not None:
                self.deliver("task", Received(done[0], time.monotonic()), done[1])
