"""The device path's pieces: provisioning writes files safely, `fedfleet keys` makes the fleet secret, `fedfleet tls`
makes a CA and a certificate that verifies, the ACL draws no Mosquitto warning, an agent that pinned the wrong
coordinator key says so and `serve` shows it while it waits, and a `serve` that never reached its broker leaves
no run directory behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedfleet.coordinator.broker import acl_text
from fedfleet.coordinator.job.provision import provision
from fedfleet.coordinator.tls import make_ca, make_server_cert
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.wire.protocol import derive_key

SECRET = b"0123456789abcdef0123456789abcdef"


def _cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedfleet.coordinator.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def test_provision_replaces_a_planted_symlink_and_never_writes_through_it(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("untouched\n")
    out = tmp_path / "devices"
    (out / "pi-07").mkdir(parents=True)
    (out / "pi-07" / "agent.key").symlink_to(target)
    (out / "pi-07" / "agent.toml").symlink_to(target)
    provision(["pi-07"], broker="mqtt://h:1883", secret=SECRET, out=out, broker_users=True)
    assert target.read_text() == "untouched\n"
    key = out / "pi-07" / "agent.key"
    assert not key.is_symlink() and key.read_text().strip() == derive_key(SECRET, "pi-07").hex()
    for secret_file in (key, out / "pi-07" / "broker.password", out / "broker" / "passwd",
                        out / "broker" / "coordinator.password"):
        assert secret_file.stat().st_mode & 0o777 == 0o600, secret_file
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    with pytest.raises(ConfigError, match="symlink"):
        provision(["pi-07"], broker="mqtt://h:1883", secret=SECRET, out=tmp_path / "linked")


@pytest.mark.parametrize("option", ["--agent-exe", "--state-dir", "--log-file", "--data", "--id"])
def test_control_characters_are_refused_with_one_line(tmp_path, option):
    secret = tmp_path / "fleet.secret"
    secret.write_text(SECRET.decode())
    secret.chmod(0o600)
    value = {"--id": "pi-07\nExecStartPre=/bin/sh -c id"}.get(option, "/opt/x\nExecStartPre=/bin/sh -c id")
    args = ["provision", "--id", "pi-07", "--broker", "mqtt://h:1883", "--secret-file", str(secret),
            "--out", str(tmp_path / "devices")]
    args = [value if a == "pi-07" and option == "--id" else a for a in args]
    if option != "--id":
        args += [option, value]
    p = _cli(*args)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "control character" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "devices" / "pi-07" / "fedfleet-agent.service").exists()


def test_keys_new_makes_a_private_fleet_secret_and_never_overwrites(tmp_path):
    made = _cli("keys", "--new", "--secret-file", "fleet.secret", "--signing-key-file", "coordinator.key",
                cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert len(bytes.fromhex(made.stdout.strip())) == 32  # the public key, for coordinator.pub
    secret = tmp_path / "fleet.secret"
    assert secret.stat().st_mode & 0o777 == 0o600 and len(bytes.fromhex(secret.read_text().strip())) == 32
    again = _cli("keys", "--new", "--secret-file", "fleet.secret", cwd=tmp_path)
    assert again.returncode == 2 and "refused to overwrite" in again.stderr
    keys = _cli("keys", "--secret-file", "fleet.secret", "pi-07", cwd=tmp_path)
    assert keys.returncode == 0 and "readable by others" not in keys.stderr
    files = _cli("keys", "--secret-file", "fleet.secret", "--out", "keys", "pi-07", "pi-08", cwd=tmp_path)
    assert files.returncode == 0 and sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["pi-07.key", "pi-08.key"]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in (tmp_path / "keys").iterdir())
    assert (tmp_path / "keys" / "pi-08.key").read_text().strip() not in files.stdout
    secret.chmod(0o644)
    loose = _cli("keys", "--secret-file", "fleet.secret", "pi-07", cwd=tmp_path)
    assert loose.returncode == 0 and "readable by others" in loose.stderr


def test_tls_certificate_is_signed_by_the_ca_for_the_hosts(tmp_path):
    from cryptography import x509

    crt, key = make_ca(tmp_path / "ca")
    assert key.stat().st_mode & 0o777 == 0o600
    files = make_server_cert(tmp_path / "ca", ["coordinator.lan", "10.0.0.2"], tmp_path / "srv")
    assert files.keyfile.stat().st_mode & 0o777 == 0o600
    ca = x509.load_pem_x509_certificate(crt.read_bytes())
    cert = x509.load_pem_x509_certificate(files.certfile.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coordinator.lan"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.2"]
    with pytest.raises(ConfigError, match="never overwritten"):
        make_ca(tmp_path / "ca")


def test_acl_patterns_all_name_the_user():
    text = acl_text("coordinator", ["coordinator", "pi-07", "pi-08"])
    patterns = [line for line in text.splitlines() if line.startswith("pattern")]
    assert patterns and all("%u" in line for line in patterns)  # Mosquitto warns about a pattern without it
    assert "user pi-07\ntopic read fedfleet/v1/+/broadcast/#" in text and text.count("user coordinator") == 1


def _fleet_keys(tmp_path: Path) -> tuple[Path, Path]:
    from fedfleet.coordinator.safe_files import write_file
    from fedfleet.edge_agent.wire import signing

    secret, key = tmp_path / "fleet.secret", tmp_path / "coordinator.key"
    write_file(secret, SECRET, secret=True)
    signing.write_private_key_file(key, signing.new_signing_seed())
    return secret, key


@pytest.mark.slow  # the coordinator gives the broker 10 s to answer
def test_serve_that_never_connected_leaves_no_run_directory(tmp_path):
    secret, key = _fleet_keys(tmp_path)
    run_dir = tmp_path / "run"
    args = ("serve", "--broker", "mqtt://127.0.0.1:1", "--secret-file", str(secret), "--signing-key-file", str(key),
            "--roster", "pi-07", "--rounds", "1", "--run-dir", str(run_dir))
    p = _cli(*args)
    assert p.returncode == 1 and "could not connect" in p.stderr, p.stderr
    assert not run_dir.exists()


@pytest.mark.slow  # serve waits 12 s for an agent that never becomes ready
def test_serve_shows_an_agents_reported_error_while_it_waits(tmp_path, mosquitto):
    import numpy as np

    from fedfleet.coordinator.job.config import JobConfig
    from fedfleet.coordinator.job.run import shards

    secret, key = _fleet_keys(tmp_path)
    (tmp_path / "wrong.pub").write_text(os.urandom(32).hex() + "\n")  # not this coordinator's key
    (tmp_path / "pi-07.key").write_text(derive_key(SECRET, "pi-07").hex())
    cfg = JobConfig()
    cfg.agents = 2
    local, _ = shards(cfg)  # what `fedfleet shards` writes for a device
    np.savez(tmp_path / "pi-07.npz", x=local[0].x, y=local[0].y)
    agent = subprocess.Popen(
        [sys.executable, "-m", "fedfleet.edge_agent.cli", "--broker", mosquitto.url, "--fleet", "bad-pub",
         "--id", "pi-07", "--key-file", str(tmp_path / "pi-07.key"), "--data", str(tmp_path / "pi-07.npz"),
         "--coordinator-key-file", str(tmp_path / "wrong.pub")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p = _cli("serve", "--broker", mosquitto.url, "--secret-file", str(secret), "--signing-key-file", str(key),
                 "--fleet", "bad-pub", "--roster", "pi-07", "--rounds", "1", "--wait", "12",
                 "--run-dir", str(tmp_path / "run"))
    finally:
        agent.terminate()
        agent.wait(10)
    waiting = [line for line in p.stdout.splitlines() if line.startswith("waiting: ")]
    assert any("pi-07 online, no model, error: bad_signature" in line for line in waiting), p.stdout + p.stderr
    assert p.returncode == 1 and "bad_signature" in p.stderr


def test_provisioned_broker_directory_runs_without_warnings_and_stops_on_sigterm(tmp_path):
    import signal
    import socket

    from fedfleet.coordinator.broker import free_port, wait_for_port

    port = free_port()
    provision(["pi-07", "pi-08"], broker=f"mqtts://127.0.0.1:{port}", secret=SECRET, out=tmp_path / "devices",
              broker_users=True, tls_ca=str(tmp_path / "ca"))
    conf = (tmp_path / "devices" / "broker" / "mosquitto.conf").read_text()
    assert f"listener {port}\n" in conf and "acl_file" in conf and "password_file" in conf and "certfile" in conf
    proc = subprocess.Popen([sys.executable, "-m", "fedfleet.coordinator.cli", "broker", "--dir",
                             str(tmp_path / "devices" / "broker")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, 20, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=15)[0].decode()
    assert proc.returncode == 0, out
    said = [line for line in out.splitlines() if "OpenSSL Error" not in line]  # the port probe's plain TCP
    assert not said, out  # Mosquitto said nothing about the config, the ACL or the files
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        pass  # SIGTERM to `fedfleet broker` stopped Mosquitto


def test_waiting_line_names_each_agents_state_and_error():
    from fedfleet.coordinator.engine.presence import Presence

    p = Presence(["pi-07", "pi-08", "pi-09"])
    p.on_status("pi-07", {"state": "online", "model": "abc"})
    p.on_status("pi-08", {"state": "online", "model": None, "error": "bad_signature: does not verify"})
    line = p.waiting_line("abc", 2)
    assert line == ("1/2 ready; pi-07 ready; pi-08 online, no model, error: bad_signature: does not verify; "
                    "pi-09 not seen")
