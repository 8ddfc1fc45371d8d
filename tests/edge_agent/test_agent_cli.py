"""`fedfleet-agent` as a user meets it: --version, help for every option, no abbreviations, one-line errors, and an
agent that says what it does at INFO without -v (here: that it cannot reach its broker), silenced by -q."""

from __future__ import annotations

import subprocess
import sys
import time

import click

from fedfleet.coordinator.broker import free_port
from fedfleet.edge_agent import cli


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedfleet.edge_agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_version_help_and_no_abbreviations():
    from importlib.metadata import version

    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"fedfleet-agent {version('fedfleet')}"
    for p in cli.cli.get_params(click.Context(cli.cli, **cli.cli.context_settings)):
        if isinstance(p, click.Option):
            assert p.help and len(p.help) > 10, p.opts
    h = _run("--help")
    assert h.returncode == 0 and "--broker" in h.stdout and "--threads" in h.stdout and "generate" in h.stdout
    r = _run("--thread", "2")
    assert r.returncode == 2 and "No such option '--thread'" in r.stderr and "\n" not in r.stderr.strip()
    g = _run("generate", "--help")
    assert g.returncode == 0 and "fedfleet-agent generate" in g.stdout and "--prompts" in g.stdout
    assert cli.main(["--no-such-option"]) == 2


def test_a_bad_key_file_is_one_line_without_the_key(tmp_path):
    key = tmp_path / "pi-01.key"
    key.write_text("ab" * 31 + "\n")  # 31 bytes: one short
    (tmp_path / "c.pub").write_text("11" * 32)
    r = _run("--broker", "mqtt://127.0.0.1:1", "--id", "pi-01", "--key-file", str(key), "--data", "x.npz",
             "--coordinator-key-file", str(tmp_path / "c.pub"))
    err = r.stderr.strip()
    assert r.returncode == 2 and "\n" not in err and "Traceback" not in err, err
    assert "32 bytes" in err and "abab" not in err


def _agent_until(tmp_path, *extra: str, needle: str, wait_s: float) -> tuple[str, float]:
    """Start an agent against a port where nothing listens; its stderr once `needle` shows (or wait_s passed),
    and the seconds that took."""
    import numpy as np

    np.savez(tmp_path / "d.npz", x=np.zeros((4, 64), np.float32), y=np.arange(4) % 2)
    (tmp_path / "a.key").write_text("00" * 32)
    (tmp_path / "c.pub").write_text("11" * 32)
    log = tmp_path / f"agent{len(extra)}.log"
    with open(log, "w") as out:
        p = subprocess.Popen([sys.executable, "-m", "fedfleet.edge_agent.cli", "--broker",
                              f"mqtt://127.0.0.1:{free_port()}", "--id", "pi-01", "--key-file", str(tmp_path / "a.key"),
                              "--data", str(tmp_path / "d.npz"), "--coordinator-key-file", str(tmp_path / "c.pub"),
                              "--meter", "none", *extra], stderr=out, stdout=out)
        t0 = time.monotonic()
        try:
            deadline = t0 + wait_s
            while time.monotonic() < deadline and needle not in log.read_text():
                time.sleep(0.1)
        finally:
            took = time.monotonic() - t0
            p.terminate()
            assert p.wait(10) == 0  # SIGTERM: a clean stop (so it was past its start-up, running)
    return log.read_text(), took


def test_an_agent_says_it_cannot_reach_its_broker_without_v_and_q_silences_it(tmp_path):
    text, took = _agent_until(tmp_path, needle="unreachable", wait_s=60)
    assert "agent pi-01 of fleet demo starting on mqtt://127.0.0.1:" in text, text
    assert "unreachable" in text and "retrying" in text, text
    quiet, _ = _agent_until(tmp_path, "-q", needle="unreachable", wait_s=2 * took + 2)  # time enough to say it
    assert "starting on" not in quiet and "unreachable" not in quiet, quiet
