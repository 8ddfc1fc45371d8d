"""End-to-end rounds over a real Mosquitto: FedAvg, hostile messages, killed and restarted agents."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from fedfleet.coordinator.records.ledger import Ledger
from fedfleet.edge_agent.wire import codecs, protocol
from fedfleet.edge_agent.wire.mqtt import MqttLink
from tests.support.fleet import COORDINATOR_KEY, SECRET, Rogue, package, start_fleet


def rows(fleet, sql: str = "SELECT * FROM agent_rounds ORDER BY id") -> list[dict]:
    ledger = Ledger(fleet.coord.run_dir / "ledger.sqlite")
    try:
        return [dict(r) for r in ledger.query(sql)]
    finally:
        ledger.close()


def test_fedavg_rounds_learn_and_fill_ledger_and_checkpoints(mosquitto, tmp_path):
    fleet = start_fleet(mosquitto.url, tmp_path, rounds=4, uplink={"name": "none"})
    try:
        fleet.coord.wait_for_agents(3, 30)
        summaries = fleet.coord.run(4)
    finally:
        fleet.close()
    assert [s.round for s in summaries] == [1, 2, 3, 4]
    assert summaries[-1].accuracy > 0.8, [s.accuracy for s in summaries]
    assert summaries[-1].accuracy > summaries[0].accuracy - 0.02
    ok = [r for r in rows(fleet) if r["status"] == "ok"]
    assert len(ok) == 12
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["samples"] > 0 and r["learn_s"] >= 0 for r in ok)
    # MQTT-level bytes: at least the float32 payload of the full 64-32-10 MLP (2,410 floats)
    assert min(r["bytes_up"] for r in ok) > 2410 * 4
    state = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=False)
    assert state["round"] == 4 and set(state["state"]) == {"fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias"}
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_hostile_messages_are_refused_recorded_and_the_round_completes(mosquitto, tmp_path):
    fleet = start_fleet(mosquitto.url, tmp_path, roster_extra=("rogue", "silent"), deadline_s=4.0, quorum=0.5,
                        uplink={"name": "none"})
    rogue = Rogue(mosquitto.url, fleet.cfg.fleet, "rogue", fleet.coord.package_digest)
    silent = Rogue(mosquitto.url, fleet.cfg.fleet, "silent", fleet.coord.package_digest)  # never answers
    try:
        fleet.coord.wait_for_agents(5, 30)
        fleet.run_async(1)
        deadline = time.time() + 10
        while not rogue.tasks and time.time() < deadline:
            time.sleep(0.02)
        assert rogue.tasks, "the rogue agent got no task"
        task, payload = rogue.tasks[0]
        good = task["meta"]["sync"]  # FedAvg's global state comes once per round by broadcast; the task names it
        zero = {n: np.zeros(s, np.float32) for n, s in codecs.normalize_layout(task["meta"]["expect"])}
        nan = {k: v.copy() for k, v in zero.items()}
        nan["fc0.weight"][0, 0] = np.nan
        wrong = dict(zero, **{"fc0.bias": np.zeros(7, np.float32)})
        rogue.link.publish(protocol.agent_topic(fleet.cfg.fleet, "rogue", "result"), b"\x00garbage")  # malformed
        rogue.send(rogue.result(task, zero, key=b"k" * 32))  # bad HMAC
        rogue.send(rogue.result(task, zero, round=task["round"] - 1))  # past round
        rogue.send(rogue.result(task, zero, round=task["round"] + 3))  # future round
        rogue.link.publish(protocol.agent_topic(fleet.cfg.fleet, "rogue", "result"), b"FFLT" + bytes(1_200_000))
        rogue.send(rogue.result(task, nan))  # NaN update
        rogue.send(rogue.result(task, {"fc0.weight": np.full((32, 64), np.inf, np.float32), **{k: v for k, v in zero.items() if k != "fc0.weight"}}))
        rogue.send(rogue.result(task, wrong))  # wrong shapes
        rogue.send(rogue.result(task, zero, agent="stranger", key=protocol.derive_key(SECRET, "stranger")),
                   agent="stranger")  # unknown agent id
        rogue.send(rogue.result(task, zero, agent="agent-00"))  # spoofed: another agent's id on rogue's topic
        rogue.send(rogue.result(task, zero))  # valid
        rogue.send(rogue.result(task, zero))  # duplicate
        summaries = fleet.join(60)
    finally:
        rogue.link.stop()
        silent.link.stop()
        fleet.close()
    assert good["mode"] == "broadcast" and len(good["digest"]) == 64 and not payload and summaries[0].ok == 4  # three honest agents and the rogue's one valid result
    status = [(r["agent"], r["status"]) for r in rows(fleet)]
    for reason in ("stale_round", "future_round", "nonfinite", "shape", "spoofed", "duplicate"):
        assert ("rogue", f"rejected:{reason}") in status, (reason, status)
    # without the key: not one row each, one summary row per reason; they never close the rogue's slot
    for reason in ("malformed", "bad_hmac", "oversized", "unknown_agent"):
        assert ("(unauthenticated)", f"rejected:{reason}") in status, (reason, status)
    assert status.count(("rogue", "rejected:nonfinite")) == 2
    assert ("rogue", "ok") in status and ("silent", "late") in status
    assert summaries[0].late == 1 and summaries[0].rejected >= 7
    assert np.isfinite(summaries[0].accuracy)


def _agent_process(url: str, fleet: str, agent: str, data_path, tmp_path) -> subprocess.Popen:
    key = tmp_path / f"{agent}.key"
    key.write_text(protocol.derive_key(SECRET, agent).hex() + "\n")
    pub = tmp_path / "coordinator.pub"
    pub.write_text(COORDINATOR_KEY.hex() + "\n")
    return subprocess.Popen(
        [sys.executable, "-m", "fedfleet.edge_agent.cli", "--broker", url, "--fleet", fleet, "--id", agent,
         "--key-file", str(key), "--data", str(data_path), "--coordinator-key-file", str(pub)],
        stdout=open(tmp_path / f"{agent}.log", "ab"), stderr=subprocess.STDOUT,
    )


def test_killed_agent_round_completes_on_quorum_and_restarted_agent_rejoins(mosquitto, tmp_path):
    fleet = start_fleet(mosquitto.url, tmp_path, roster_extra=("proc-agent",), deadline_s=5.0, quorum=0.5)
    from fedfleet.coordinator.job.run import shards

    local, _ = shards(fleet.cfg)
    data_path = tmp_path / "proc.npz"
    np.savez(data_path, x=local[0].x, y=local[0].y)
    proc = _agent_process(mosquitto.url, fleet.cfg.fleet, "proc-agent", data_path, tmp_path)
    try:
        try:
            fleet.coord.wait_for_agents(4, 60)
        except TimeoutError as exc:  # say why: the agent process's own log
            log = (tmp_path / "proc-agent.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"{exc}; agent exit code {proc.poll()}; its log:\n{log}") from None
        first = fleet.coord.run_round(1)
        assert first.ok == 4
        # round 2: kill the agent process the moment the round starts
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("s", fleet.coord.run_round(2)))
        t.start()
        while fleet.coord.round != 2:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        t.join(60)
        second = result["s"]
        assert second.selected == 4 and second.ok >= 3 and second.ok + second.late == 4
        # restart the same agent: it rejoins and is selected for the next round
        proc = _agent_process(mosquitto.url, fleet.cfg.fleet, "proc-agent", data_path, tmp_path)
        fleet.coord.wait_for_agents(4, 30)
        later = [fleet.coord.run_round(r) for r in (3, 4)]
        assert later[-1].ok == 4
    finally:
        proc.kill()
        proc.wait(10)
        fleet.close()
    statuses = {(r["round"], r["status"]) for r in rows(fleet) if r["agent"] == "proc-agent"}
    assert (1, "ok") in statuses and (4, "ok") in statuses


def test_broken_agent_options_and_config_give_clear_errors(tmp_path):
    bad = tmp_path / "job.toml"
    bad.write_text("[job]\nrounds = 'many'\n")
    r = subprocess.run([sys.executable, "-m", "fedfleet.coordinator.cli", "demo", "--config", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "field 'rounds'" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "bad.key").write_text("zz\n")
    (tmp_path / "x.pub").write_text(COORDINATOR_KEY.hex() + "\n")
    r = subprocess.run([sys.executable, "-m", "fedfleet.edge_agent.cli", "--broker", "mqtt://127.0.0.1:1", "--id", "a",
                        "--key-file", str(tmp_path / "bad.key"), "--data", str(tmp_path / "none.npz"),
                        "--coordinator-key-file", str(tmp_path / "x.pub")], capture_output=True, text=True)
    assert r.returncode == 2 and "hex" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "good.key").write_text("00" * 32 + "\n")
    r = subprocess.run([sys.executable, "-m", "fedfleet.edge_agent.cli", "--broker", "mqtt://127.0.0.1:1", "--id", "a",
                        "--key-file", str(tmp_path / "good.key"), "--data", str(tmp_path / "none.npz"),
                        "--coordinator-key-file", str(tmp_path / "missing.pub")], capture_output=True, text=True)
    assert r.returncode == 2 and "--coordinator-key-file" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("spec", [{"name": "zstd"}, {"name": "fedzip", "z": 0.05}, None])
def test_uplink_codec_is_chosen_per_task(mosquitto, tmp_path, spec):
    # the default-uplink case also compresses the downlink (tasks) with zstd
    fleet = start_fleet(mosquitto.url, tmp_path, uplink=spec, rounds=2, downlink="zstd" if spec is None else "none")
    try:
        fleet.coord.wait_for_agents(3, 30)
        s = fleet.coord.run(2)
    finally:
        fleet.close()
    codec_rows = {r["codec"] for r in rows(fleet) if r["status"] == "ok"}
    assert codec_rows == {spec["name"] if spec else "fedzip"} and s[-1].ok == 3  # FedZip is FedAvg's default
    assert package  # the session cache is shared with the other tests


def test_package_is_republished_to_an_agent_online_without_it(mosquitto, tmp_path):
    """An agent that says it is online but has no model (a lost delivery) gets the package again while the
    coordinator waits; one that reported an error about the package does not trigger a republish."""
    fleet = start_fleet(mosquitto.url, tmp_path, roster_extra=("lost",))
    copies: list[int] = []
    watcher = MqttLink(mosquitto.url, client_id="watch-model", clean_session=True,
                       on_message=lambda topic, payload: copies.append(len(payload)) if payload else None,
                       subscriptions=[protocol.broadcast_topic(fleet.cfg.fleet, "model/0")])
    watcher.start()
    try:
        fleet.coord.wait_for_agents(3, 30)
        time.sleep(0.3)
        assert len(copies) == 1  # the retained copy, on subscribing
        lost = Rogue(mosquitto.url, fleet.cfg.fleet, "lost", None)  # online, model: null
        with pytest.raises(TimeoutError, match=r"not ready: \{'lost': 'online, model None'\}"):
            fleet.coord.wait_for_agents(4, 1.6, republish_s=0.5)
        time.sleep(0.3)
        assert len(copies) >= 3, copies  # published again at least twice while waiting
        lost.link.publish(protocol.agent_topic(fleet.cfg.fleet, "lost", "status"), lost.status(
            {"state": "online", "model": None, "error": "model_error: broken"}))
        time.sleep(0.3)
        before = len(copies)
        with pytest.raises(TimeoutError, match="model_error: broken"):
            fleet.coord.wait_for_agents(4, 1.2, republish_s=0.3)
        time.sleep(0.3)
        assert len(copies) == before  # an agent that refused the package says why; resending cannot help
        lost.link.stop()
    finally:
        watcher.stop()
        fleet.close()
