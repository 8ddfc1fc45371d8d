"""docs/tutorials/pi-fleet.md, followed literally on one machine.

The test takes the shell commands from the page's ```bash blocks (continuation lines joined), puts 127.0.0.1
and a free port in place of `coordinator.lan:8883`, and runs them in order in an empty directory, each timed.
`fedfleet ...` runs as `python -m fedfleet.coordinator.cli ...` (with its `> file` and trailing `&`). Where a
command needs something this machine is not, the test does its nearest real equivalent:
- `python -m pip wheel ... .` builds the wheel from this checkout (offline: `--no-build-isolation`);
- `pip install ./dist/<wheel>[coordinator]` is not run (this environment is the coordinator's install): the test
  checks that the wheel the page names is the one the build made;
- `scp -r A B C pi@<pi>.lan:` copies A, B and C into a directory standing for that Pi's home;
- `ssh -t pi@<pi>.lan sudo sh <pi>/install.sh` needs root and systemd on a Pi: the test checks the script's syntax
  and that what it expects is in the Pi's home (one wheel, `<pi>/`, `<pi>.npz`), then starts the agent as the
  unit's `ExecStart` line does, with the config from the Pi's home, and the data, state and log paths that
  install.sh would use moved into the test's directory through `--data`, `--state-dir` and `--log-file`;
- the per-Pi commands run for pi-07 as written and for pi-08 with the id replaced, as the page says;
- `--rounds 5` becomes `--rounds 3`.
Then it checks that `serve` finished 3 rounds over TLS, with the ACL, and results from two agent processes,
that the broker logged no warning, and that SIGTERM to `fedfleet broker` stopped Mosquitto."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "tutorials" / "pi-fleet.md"
PIS = ("pi-07", "pi-08")


def page_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", PAGE.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        text = block.replace("\\\n", " ")
        commands += [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return commands


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def test_the_pi_tutorial_runs_as_written(tmp_path):
    work, port = tmp_path / "coordinator", free_port()
    work.mkdir()
    commands = page_commands()
    assert len(commands) <= 10, commands  # the page's promise
    times: list[tuple[str, float]] = []
    background: dict[str, subprocess.Popen] = {}
    agents: dict[str, subprocess.Popen] = {}
    wheel_name = None
    startup_log = [None]  # what the broker said as it started

    def run(argv: list[str], *, stdout_to: Path | None = None, timeout: float = 300) -> None:
        out = open(stdout_to, "wb") if stdout_to else subprocess.PIPE  # noqa: SIM115
        p = subprocess.run(argv, cwd=work, stdout=out, stderr=subprocess.PIPE, timeout=timeout)
        if stdout_to:
            out.close()
        assert p.returncode == 0, f"{argv}: rc {p.returncode}\n{p.stderr.decode()[-3000:]}"

    def fedfleet(cmd: str) -> None:
        words = shlex.split(cmd)
        redirect = None
        if ">" in words:
            i = words.index(">")
            redirect, words = work / words[i + 1], words[:i] + words[i + 2:]
        argv = [sys.executable, "-m", "fedfleet.coordinator.cli", *words[1:]]
        if words[-1] == "&":
            log = open(tmp_path / f"{words[1]}.log", "wb")  # noqa: SIM115
            background[words[1]] = subprocess.Popen(argv[:-1], cwd=work, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 20
            while not _port_open(port):
                assert background[words[1]].poll() is None and time.monotonic() < deadline, \
                    (tmp_path / f"{words[1]}.log").read_text()
                time.sleep(0.05)
            time.sleep(0.5)
            startup_log[0] = (tmp_path / f"{words[1]}.log").read_text()
            return
        run(argv, stdout_to=redirect, timeout=400)

    def per_pi(cmd: str, pi: str) -> None:
        words = shlex.split(cmd)
        home = tmp_path / f"home-{pi}"
        if words[0] == "scp":
            assert words[-1] == f"pi@{pi}.lan:", words
            home.mkdir()
            for src in words[1:-1]:
                if src == "-r":
                    continue
                s = work / src
                (shutil.copytree if s.is_dir() else shutil.copy)(s, home / s.name)
            return
        assert words[:4] == ["ssh", "-t", f"pi@{pi}.lan", "sudo"] and words[4:] == ["sh", f"{pi}/install.sh"], words
        script = home / pi / "install.sh"
        assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
        assert len(list(home.glob("fedfleet-*-py3-none-any.whl"))) == 1 and (home / f"{pi}.npz").is_file()
        unit = (home / pi / "fedfleet-agent.service").read_text()
        exec_start = shlex.split(re.search(r"^ExecStart=(.*)$", unit, flags=re.M).group(1))
        assert exec_start[0].endswith("/bin/fedfleet-agent"), exec_start
        args = [a.replace("/etc/fedfleet-agent/", f"{home / pi}/") for a in exec_start[1:]]
        log = open(tmp_path / f"{pi}.out", "wb")  # noqa: SIM115
        agents[pi] = subprocess.Popen(
            [sys.executable, "-m", "fedfleet.edge_agent.cli", *args, "--data", str(home / f"{pi}.npz"),
             "--state-dir", str(home / "var-lib"), "--log-file", str(home / "var-log" / "agent.log")],
            stdout=log, stderr=subprocess.STDOUT)

    try:
        for cmd in commands:
            cmd = cmd.replace("coordinator.lan:8883", f"127.0.0.1:{port}").replace("coordinator.lan", "127.0.0.1")
            cmd = cmd.replace("--rounds 5", "--rounds 3")
            t0 = time.perf_counter()
            words = shlex.split(cmd)
            if words[:4] == ["python", "-m", "pip", "wheel"]:
                assert words[-1] == "." and "-w" in words
                dist = work / words[words.index("-w") + 1]
                run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                     str(ROOT)])
                (wheel,) = dist.glob("fedfleet-*-py3-none-any.whl")
                wheel_name = wheel.name
            elif words[:2] == ["pip", "install"]:
                named = re.sub(r"\[.*\]$", "", words[2])
                assert (work / named).is_file(), f"the page installs {named}; the build made {wheel_name}"
            elif words[0] == "fedfleet":
                fedfleet(cmd)
            elif words[0] in ("scp", "ssh"):
                for pi in PIS:
                    per_pi(cmd.replace("pi-07", pi), pi)
            else:
                raise AssertionError(f"the tutorial has a command this test does not know how to follow: {cmd}")
            times.append((cmd, time.perf_counter() - t0))
        assert len(agents) == 2 and all(p.poll() is None for p in agents.values())
    finally:
        for p in agents.values():
            p.send_signal(signal.SIGTERM)
        for p in agents.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        broker = background.get("broker")
        broker_rc = None
        if broker is not None:
            broker.send_signal(signal.SIGTERM)
            try:
                broker_rc = broker.wait(15)
            except subprocess.TimeoutExpired:
                broker.kill()
        for cmd, seconds in times:
            print(f"{seconds:7.2f} s  {cmd}")
    assert broker_rc == 0
    assert not _port_open(port)  # SIGTERM to `fedfleet broker` stopped Mosquitto
    # Mosquitto loaded the config, passwords, ACL and certificates without a warning or an error, and logged no
    # warning or error of its own later: the only lines allowed are OpenSSL's about a client's TLS connection
    # (one closed without close_notify as its process ended, or this test's plain-TCP port probe)
    for text in (startup_log[0], (tmp_path / "broker.log").read_text()):
        assert not [line for line in text.splitlines() if "OpenSSL Error" not in line], text

    conf = (work / "devices" / "broker" / "mosquitto.conf").read_text()
    assert "acl_file" in conf and "certfile" in conf and "allow_anonymous false" in conf
    (run_dir,) = (work / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["broker"].startswith("mqtts://127.0.0.1:"), summary
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        rows = db.execute("SELECT agent, COUNT(*) FROM agent_rounds WHERE status = 'ok' GROUP BY agent").fetchall()
    assert {agent for agent, _ in rows} == set(PIS), rows
    for pi in PIS:  # each device wrote its log where the command line put it
        assert "starting on mqtts://127.0.0.1" in (tmp_path / f"home-{pi}" / "var-log" / "agent.log").read_text()
