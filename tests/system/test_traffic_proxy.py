"""The ledger's books held against an independent count: a byte-counting TCP proxy in front of Mosquitto, the
default demo through it (issue 22's targets).

- per agent, the ledger's total over every category (`traffic`) is within 2% of what its TCP stream carried;
- the fleet total in summary.json ("all device traffic") is within 2% of the sum over the agents' streams;
- the ledger's socket counts (`sockets`, the agents' TCP_INFO) are within 0.5% of the proxy's, per agent.
"""

from __future__ import annotations

import json
import sqlite3

from fedfleet.coordinator.broker import MosquittoBroker
from fedfleet.coordinator.job.config import JobConfig
from fedfleet.coordinator.job.run import run_demo
from tests.support.byte_proxy import ByteProxy, connect_client_id


def test_connect_client_id_parses_a_connect_packet():
    from fedfleet.edge_agent.wire.traffic import connect_bytes

    cid = "fedfleet-demo-agent-03"
    body = b"\x00\x04MQTT\x04\x02\x00\x1e" + len(cid).to_bytes(2, "big") + cid.encode()
    packet = bytes([0x10, len(body)]) + body
    assert connect_client_id(packet) == cid
    assert connect_client_id(packet[:12]) is None  # not all of it yet
    assert connect_bytes(cid) == (len(packet), 4)  # the formula the agents book their CONNECT by


def test_ledger_matches_each_agents_tcp_stream(tmp_path):
    cfg = JobConfig()  # the default demo: 10 agents, 20 rounds
    broker = MosquittoBroker()
    proxy = ByteProxy(broker.port)
    try:
        run_demo(cfg, broker=proxy.url, run_dir=tmp_path / "run", quiet=True, report="none")
        streams = proxy.by_client()
    finally:
        proxy.stop()
        broker.stop()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    db = sqlite3.connect(tmp_path / "run" / "ledger.sqlite")
    ledger = {a: u + d for a, u, d in db.execute("SELECT agent, SUM(bytes_up), SUM(bytes_down) FROM traffic GROUP BY agent")}
    sockets = {a: (u, d) for a, u, d in db.execute("SELECT agent, SUM(bytes_up), SUM(bytes_down) FROM sockets GROUP BY agent")}
    cats = {c for (c,) in db.execute("SELECT DISTINCT category FROM traffic")}
    prefix = f"fedfleet-{cfg.fleet}-"
    agents = {cid[len(prefix):]: ud for cid, ud in streams.items() if cid.startswith(prefix)}
    assert sorted(agents) == sorted(ledger) and len(agents) == cfg.agents, (streams, ledger)
    assert cats == {"model", "state", "task", "result", "status", "telemetry", "control"}
    print("agent  proxy(up,down)  ledger-all  ledger-socket")
    for a, (up, down) in sorted(agents.items()):
        print(a, up, down, ledger[a], sockets[a])
        assert abs(ledger[a] - (up + down)) <= 0.02 * (up + down), (a, ledger[a], up, down)
        assert abs(sum(sockets[a]) - (up + down)) <= 0.005 * (up + down), (a, sockets[a], up, down)
        assert abs(sockets[a][0] - up) <= 0.005 * up and abs(sockets[a][1] - down) <= 0.005 * down, (a, sockets[a])
    fleet = sum(u + d for u, d in agents.values())
    books = summary["books"]
    assert abs(books["all_device_traffic"]["total"] - fleet) <= 0.02 * fleet, (books, fleet)
    assert "every MQTT message" in books["all_device_traffic"]["counts"]
    # model updates are a part of it, and summary.json's bytes_up / bytes_down are that part, so labelled
    updates = books["model_updates"]
    assert 0 < updates["total"] < books["all_device_traffic"]["total"]
    assert (summary["bytes_up"], summary["bytes_down"]) == (updates["up"], updates["down"])
    # ... and the agents' own count of those categories agrees with the coordinator's
    cats = books["all_device_traffic"]["by_category"]
    agents_view = cats["task"]["down"] + cats["state"]["down"] + cats["result"]["up"]
    assert abs(agents_view - updates["total"]) <= 0.01 * updates["total"], (cats, updates)
    assert summary["bytes_counts"] == updates["counts"]
    assert books["refusals"]["rows"] == db.execute("SELECT COUNT(*) FROM agent_rounds WHERE status LIKE 'rejected:%'").fetchone()[0]
