"""The README's device flow, end to end through the command lines: `fedfleet keys`, `fedfleet shards`,
`fedfleet serve` and two `fedfleet-agent` processes, over a Mosquitto TLS listener."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from fedfleet.coordinator.broker import MosquittoBroker
from fedfleet.coordinator.tls import make_local_ca


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedfleet.coordinator.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, "PYTHONFAULTHANDLER": "1"})


def test_serve_with_agents_on_devices_over_tls(tmp_path):
    repo = os.getcwd()
    tls = make_local_ca(tmp_path / "tls")
    broker = MosquittoBroker(tls=tls)
    secret = tmp_path / "fleet.secret"
    secret.write_text(os.urandom(32).hex())
    agents = []
    try:
        keys = _cli("keys", "--secret-file", str(secret), "pi-01", "pi-02", cwd=repo)
        assert keys.returncode == 0, keys.stderr
        key_of = dict(line.split() for line in keys.stdout.splitlines())
        signing_key = tmp_path / "coordinator.key"
        made = _cli("keys", "--signing-key-file", str(signing_key), "--new", cwd=repo)
        assert made.returncode == 0, made.stderr
        assert oct(os.stat(signing_key).st_mode & 0o777) == "0o600"
        again = _cli("keys", "--signing-key-file", str(signing_key), "--new", cwd=repo)
        assert again.returncode == 2 and "overwrite" in again.stderr  # never replaces a key agents have pinned
        public = _cli("keys", "--signing-key-file", str(signing_key), "--public", cwd=repo)
        assert public.returncode == 0 and public.stdout.strip() == made.stdout.strip()
        (tmp_path / "coordinator.pub").write_text(public.stdout)
        shards = _cli("shards", "--out", str(tmp_path / "shards"), "--agents", "2", cwd=repo)
        assert shards.returncode == 0, shards.stderr
        for i, agent in enumerate(("pi-01", "pi-02")):
            (tmp_path / f"{agent}.key").write_text(key_of[agent])
            log = open(tmp_path / f"{agent}.log", "wb")  # noqa: SIM115
            agents.append(subprocess.Popen(
                [sys.executable, "-m", "fedfleet.edge_agent.cli", "--broker", broker.url, "--fleet", "lab", "--id", agent,
                 "--key-file", str(tmp_path / f"{agent}.key"), "--data", str(tmp_path / "shards" / f"agent-{i:02d}.npz"),
                 "--ca-certs", str(tls.cafile), "--profile", "rpi4b",
                 "--coordinator-key-file", str(tmp_path / "coordinator.pub")], stdout=log, stderr=subprocess.STDOUT, cwd=repo))
        served = _cli("serve", "--broker", broker.url, "--secret-file", str(secret), "--fleet", "lab",
                      "--signing-key-file", str(signing_key),
                      "--roster", "pi-01,pi-02", "--rounds", "3", "--ca-certs", str(tls.cafile), "--wait", "60",
                      "--run-dir", str(tmp_path / "run"), "--json", str(tmp_path / "serve.json"), cwd=repo)
        assert served.returncode == 0, served.stdout[-2000:] + served.stderr[-2000:]
    finally:
        for p in agents:
            p.terminate()
            p.wait(10)
        broker.stop()
    result = json.loads((tmp_path / "serve.json").read_text())
    assert result["rounds"] == 3 and result["agents"] == 2 and result["final_accuracy"] > 0.5
    for agent in ("pi-01", "pi-02"):  # what each agent said at its default level (no -v)
        said = (tmp_path / f"{agent}.log").read_text()
        assert f"agent {agent} connected to {broker.url} (fleet lab)" in said, said[-3000:]
        assert "received and verified" in said, said[-3000:]
        assert "fedavg trained on" in said and "result sent (" in said, said[-3000:]  # its tasks, one line each
    report, deadline = tmp_path / "run" / "report" / "report.html", time.time() + 120
    while not report.exists() and time.time() < deadline:  # rendered in its own process after the summary
        time.sleep(0.2)
    assert report.exists()
