"""Over-selection for dropouts (`over_select`) over a real Mosquitto: a round tasks more agents than its cohort,
aggregates the first `per_round` valid results without waiting for the rest, and books the others `surplus`."""

from __future__ import annotations

import time

from fedfleet.coordinator.records.ledger import Ledger
from tests.support.fleet import Rogue, start_fleet


def test_over_selection_closes_the_round_on_its_cohort_and_books_the_rest_surplus(mosquitto, tmp_path):
    # 3 agents and one that never answers, all tasked (per_round 2, over_select 1.0: ceil(2 * 2) = 4 of 4)
    fleet = start_fleet(mosquitto.url, tmp_path, roster_extra=("silent",), rounds=2, per_round=2, over_select=1.0,
                        deadline_s=60.0, uplink={"name": "none"})
    silent = Rogue(mosquitto.url, fleet.cfg.fleet, "silent", fleet.coord.package_digest)
    try:
        fleet.coord.wait_for_agents(4, 30)
        t0 = time.monotonic()
        summaries = fleet.coord.run(2)
        took = time.monotonic() - t0
    finally:
        fleet.close()
        silent.link.stop()
    assert len(silent.tasks) == 2, "the silent agent was not tasked in both rounds"
    assert took < 40, f"the rounds waited for the silent agent ({took:.1f} s; the deadline is 60 s)"
    assert [(s.selected, s.ok, s.late, s.surplus) for s in summaries] == [(4, 2, 0, 2), (4, 2, 0, 2)]
    assert summaries[-1].accuracy > 0.3
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        rows = [dict(r) for r in ledger.query("SELECT round, agent, status, detail, bytes_down FROM agent_rounds "
                                              "WHERE round >= 1 ORDER BY id")]
    finally:
        ledger.close()
    for r in (1, 2):
        mine = [x for x in rows if x["round"] == r]
        assert sorted(x["status"] for x in mine) == ["ok", "ok", "surplus", "surplus"], mine
        assert {x["agent"] for x in mine} == {"agent-00", "agent-01", "agent-02", "silent"}
        assert all(x["bytes_down"] > 0 for x in mine)  # every tasked agent's task bytes are booked
        silent_row = next(x for x in mine if x["agent"] == "silent")
        assert silent_row["status"] == "surplus" and "no result before the cohort of 2" in silent_row["detail"]
