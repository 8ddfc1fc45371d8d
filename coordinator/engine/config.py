"""The engine's configuration (`EngineConfig`, a run's `[engine]` settings) and what it reports after each round
(`RoundSummary`). Both are re-exported by `fedfleet.coordinator.engine.rounds`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EngineConfig:
    fleet: str = "demo"
    run: str = "run"
    rounds: int = 20
    per_round: int = 0  # agents per round; 0 = every online agent
    over_select: float = 0.0  # task ceil(per_round * (1 + this)); aggregate the first per_round (the rest: surplus)
    quorum: float = 0.5  # fraction of the selected agents needed to close a round at its deadline
    deadline_s: float = 30.0  # per phase, from dispatch
    grace_s: float = 30.0  # after the deadline, how long to wait for a quorum before closing anyway
    max_result_bytes: int = 64 << 20
    seed: int = 0
    downlink: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    norm_bound: float = 10.0  # refuse updates above this multiple of the running median norm (0: off)
    weight_cap: float = 4.0  # cap a result's sample weight at this multiple of the median announced count
    per_sender_pending: int = 4  # partial (chunked) results in flight per agent
    reject_rows: int = 16  # ledger rows of refusals per agent per phase; the rest are summed in one row


@dataclass
class RoundSummary:
    round: int
    accuracy: float
    loss: float
    wall_s: float
    selected: int  # tasks dispatched in the round (agents x phases)
    ok: int
    rejected: int
    late: int
    bytes_up: int
    bytes_down: int
    slowest_learn_s: float
    timings: dict[str, float] = field(default_factory=dict)  # dispatch, collect, aggregate, evaluate, checkpoint
    note: str = ""  # the method's own word on its state (Strategy.round_note), shown in progress lines
    accuracy_min: float | None = None  # per-node methods (MoNNA): the worst node's; accuracy is their mean
    nodes: int = 0  # models scored for the round's accuracy (0: the one global model)
    surplus: int = 0  # tasked by over-selection but not needed: the cohort was full first (not in `late`)
