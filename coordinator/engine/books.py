"""A phase's ledger rows: `ok` rows (held until the phase closes, so the norm bound and a late energy report can
still change them), `late` rows, refusals (itemised up to `reject_rows` per agent, the rest summed in one
`rejected:rate_limited` row), one summary row per reason for unauthenticated messages and for refused status and
telemetry, energy reports (on the result's row while it is held, else added to the row already written), and
traffic reports (an agent's bytes by category and its socket's since its previous report, in `traffic` and
`sockets`, on the round the report names).

Statuses are `ok`, `late`, `surplus` (over-selection: tasked, but the cohort was full before its result was
taken) and `rejected:<Refusal value>`; the engine writes a phase's rows in one transaction.
"""

from __future__ import annotations

from typing import Any

from fedfleet.coordinator.engine.inbox import EnergyReport, TrafficReport
from fedfleet.coordinator.records.ledger import Ledger
from fedfleet.coordinator.strategies import ClientResult
from fedfleet.edge_agent.errors import Refusal

UNAUTHENTICATED = "(unauthenticated)"  # the agent column of summary rows for messages that failed authentication


class PhaseBooks:
    def __init__(self, ledger: Ledger, *, run: str, r: int, phase: int, reject_rows: int,
                 profiles: dict[str, str] | None = None) -> None:
        self.ledger = ledger
        self.profiles = profiles or {}  # agent -> the profile its status announced: on rows without a result too
        self.run, self.round, self.phase = run, r, phase
        self.reject_rows = reject_rows
        self.held: dict[str, tuple[ClientResult, dict[str, Any]]] = {}  # validated results, their rows not written
        self._reject_count: dict[str, int] = {}
        self._traffic: list[TrafficReport] = []  # traffic reports not written yet (`summarise` writes them at once)

    def hold(self, result: ClientResult, row: dict[str, Any]) -> None:
        """Keep a valid result's `ok` row until the phase closes."""
        self.held[result.agent] = (result, row)

    def refuse(self, agent: str, reason: Refusal, detail: str, *, bytes_up: int, bytes_down: int) -> None:
        """A refusal of an authenticated message. Past `reject_rows` in the phase an agent's refusals are only
        counted (`summarise` writes one row for them), except the one that carries its task's bytes."""
        n = self._reject_count[agent] = self._reject_count.get(agent, 0) + 1
        if n > self.reject_rows and not bytes_down:
            return
        self.ledger.record(self.run, self.round, agent[:64], reason.status, phase=self.phase, bytes_up=bytes_up,
                           bytes_down=bytes_down, detail=detail[:500], profile=self.profiles.get(agent))

    def refuse_norm(self, agent: str, norm: float, bound: float, norm_bound: float) -> None:
        """A held result refused by the update-norm bound: its row is written as `rejected:norm_bound`."""
        _, row = self.held.pop(agent)
        self.ledger.record(self.run, self.round, agent, Refusal.NORM_BOUND.status, phase=self.phase,
                           bytes_up=row["bytes_up"], bytes_down=row["bytes_down"],
                           detail=f"update norm {norm:.4g} exceeds the bound {bound:.4g} "
                                  f"({norm_bound:g} x the running median)")

    def refuse_held(self, agent: str, reason: Refusal, detail: str) -> None:
        """A held result refused when the phase closed (a method's bound over the whole phase): its row says why."""
        _, row = self.held.pop(agent)
        self.ledger.record(self.run, self.round, agent, reason.status, phase=self.phase,
                           bytes_up=row["bytes_up"], bytes_down=row["bytes_down"], detail=detail[:500])

    def book_held(self, up: dict[str, int]) -> None:
        """Write the held `ok` rows (by agent), with the result bytes counted since."""
        rows = []
        for agent, (_, row) in sorted(self.held.items()):
            row["bytes_up"] = max(row["bytes_up"], up.get(agent, 0))
            rows.append((agent, "ok", row))
        self.ledger.record_many(self.run, self.round, rows, phase=self.phase)
        self.held = {}

    def late(self, agent: str, *, bytes_up: int, bytes_down: int) -> None:
        self.ledger.record(self.run, self.round, agent, "late", phase=self.phase, bytes_up=bytes_up,
                           bytes_down=bytes_down, detail="no valid result by the deadline", profile=self.profiles.get(agent))

    def surplus(self, agent: str, *, bytes_up: int, bytes_down: int, detail: str) -> None:
        """A tasked agent over-selection did not need: the round's cohort was full before its result was taken."""
        self.ledger.record(self.run, self.round, agent, "surplus", phase=self.phase, bytes_up=bytes_up,
                           bytes_down=bytes_down, detail=detail[:500], profile=self.profiles.get(agent))

    def late_bytes(self, agent: str, r: int, phase: int, nbytes: int) -> None:
        """A late result arrived: the bytes it cost go on its `late` (or `surplus`) row (round `r`, phase `phase`)."""
        self.ledger.add_bytes(self.run, r, phase, agent, nbytes)

    def energy(self, report: EnergyReport) -> None:
        """An energy report: on its result's row while that is held, else added to the row already written."""
        energy = {"energy_compute_j": report.compute_j, "energy_radio_j": report.radio_j,
                  "energy_idle_j": report.idle_j, "energy_meter": report.meter}
        held = self.held.get(report.agent)
        if held is not None and (report.round, report.phase) == (self.round, self.phase):
            held[1].update(energy)
            return
        self.ledger.add_energy(self.run, report.round, report.phase, report.agent, compute_j=report.compute_j,
                               radio_j=report.radio_j, idle_j=report.idle_j, meter=report.meter)

    def traffic(self, report: TrafficReport) -> None:
        """An agent's bytes by category (and its socket's) since its previous report, on the report's round; written
        with the phase's summaries (`summarise`), all of them in one statement."""
        self._traffic.append(report)

    def write_traffic(self) -> None:
        """Write the traffic reports held since the last write (`traffic`), in one statement per table."""
        if self._traffic:
            self.ledger.record_traffic_many(self.run, [(t.round, t.agent, t.traffic, t.wire) for t in self._traffic])
            self._traffic = []

    def summarise(self, dropped: dict[Refusal, tuple[int, int, list[str]]],
                  refused: dict[tuple[str, Refusal], tuple[int, list[str]]]) -> None:
        """One row per reason for unauthenticated messages (`dropped`: reason -> (count, bytes, claimed ids)), one per
        agent and reason for refused status and telemetry (`refused`), and one per agent for refusals past its row
        cap; then the cap starts again. The traffic reports held since the last call are written first."""
        self.write_traffic()
        for reason, (count, nbytes, ids) in sorted(dropped.items()):
            self.ledger.record(self.run, self.round, UNAUTHENTICATED, reason.status, phase=self.phase,
                               bytes_up=nbytes, detail=f"{count} unauthenticated messages dropped; "
                                                       f"claimed ids: {', '.join(ids)}"[:500])
        for (agent, reason), (count, kinds) in sorted(refused.items()):
            self.ledger.record(self.run, self.round, agent, reason.status, phase=self.phase,
                               detail=f"{count} {' and '.join(kinds)} messages refused")
        for agent, count in sorted(self._reject_count.items()):
            if count > self.reject_rows:
                self.ledger.record(self.run, self.round, agent, Refusal.RATE_LIMITED.status, phase=self.phase,
                                   detail=f"{count - self.reject_rows} more refusals in this phase not itemised")
        self._reject_count = {}
