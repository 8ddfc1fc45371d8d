"""The engine's inbox items: what the receive path (network thread) hands the engine thread, one frozen dataclass
per kind. Every item is authenticated (its sender's HMAC verified); unauthenticated messages never become items.

- `ChunkBytes`: one verified result chunk's MQTT bytes, for the sender's `bytes_up`.
- `ResultMessage`: a complete, reassembled, schema-checked result (header and payload).
- `Refused`: an authenticated result message the receive path refused, with the run, round and phase its
  header named where those were well-typed (the engine decides whether it answers the agent's open task).
- `EnergyReport`: a checked energy telemetry event, booked on the result row it belongs to.
- `TrafficReport`: the bytes by category an agent reported with it, booked in the `traffic` table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedfleet.edge_agent.errors import Refusal


@dataclass(frozen=True)
class ChunkBytes:
    agent: str
    nbytes: int  # MQTT bytes of the chunk's PUBLISH (and PUBACK)


@dataclass(frozen=True)
class ResultMessage:
    agent: str
    header: dict[str, Any]  # schema-checked by the receive path (receive.check_result_header)
    body: bytes  # the whole, reassembled payload (its digest matched the header's)


@dataclass(frozen=True)
class Refused:
    agent: str
    reason: Refusal
    detail: str
    nbytes: int  # MQTT bytes of the refused message
    run: str | None = None  # what the message's header named, where well-typed
    round: int | None = None
    phase: int | None = None

    def names(self, run: str, round: int, phase: int) -> bool:
        """Whether the refused message named this run, round and phase (then it answers the agent's task there)."""
        return self.run == run and self.round == round and self.phase == phase


@dataclass(frozen=True)
class EnergyReport:
    agent: str
    run: str
    round: int
    phase: int
    compute_j: float
    radio_j: float
    idle_j: float
    meter: str | None = None  # the agent's meter kind: "model" (from its profile) or a hardware meter


@dataclass(frozen=True)
class TrafficReport:
    """An agent's bytes by category since its previous report (`fedfleet.edge_agent.wire.traffic`), and its
    socket's TCP bytes over the same span (None: the platform cannot tell), booked on the report's round."""

    agent: str
    run: str
    round: int
    phase: int
    traffic: dict[str, tuple[int, int]]
    wire: tuple[int, int] | None


InboxItem = ChunkBytes | ResultMessage | Refused | EnergyReport | TrafficReport
