"""`fedfleet provision`: everything a device needs to join a fleet, written to one directory per device.

    fedfleet provision --id pi-07 --broker mqtts://coordinator.lan:8883 --secret-file fleet.secret \
        --out devices [--fleet lab] [--coordinator-key-file coordinator.pub] [--ca-certs ca.pem] \
        [--broker-users] [--profile rpi4b] [--runtime onnxruntime] [--data PATH] [--state-dir PATH]

`--id` takes one id or a comma-separated roster. For each id, `OUT/<id>/` gets:
- `agent.key` (0600): the agent's own key, derived from the fleet secret (which stays on the coordinator);
- `coordinator.pub`: a copy of the coordinator's Ed25519 public key (64 hex digits), pinned by the agent;
- `ca.pem`: a copy of the broker's CA, for mqtts://;
- `broker.password` (0600), with `--broker-users`: the agent's broker password (user name = agent id);
- `agent.toml`: what `fedfleet-agent --config` reads (edge_agent/config_file.py); paths relative to it;
- `fedfleet-agent.service`: a systemd unit (Restart=always, a dedicated user, NoNewPrivileges,
  ProtectSystem=strict, StateDirectory and LogsDirectory as the only writable places).
With `--broker-users`, `OUT/broker/` gets the matching Mosquitto `passwd` (PBKDF2-SHA512, the format of
`mosquitto_passwd`), the `acl` (fedfleet.coordinator.broker.acl_text: each agent writes only under its own id) and the
coordinator's own `coordinator.password` (0600), for `fedfleet serve --username coordinator --password-file`.
Nothing secret is ever printed or put on a command line.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from pathlib import Path

from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.edge_agent.errors import ConfigError, FedfleetError
from fedfleet.edge_agent.wire.mqtt import BrokerURL
from fedfleet.edge_agent.wire.protocol import derive_key, valid_id

INSTALL_DIR = "/etc/fedfleet-agent"  # where the README copies OUT/<id>/ on the device
STATE_DIR = "/var/lib/fedfleet-agent"
LOG_FILE = "/var/log/fedfleet-agent/agent.log"
AGENT_EXE = "/opt/fedfleet/bin/fedfleet-agent"
SERVICE_USER = "fedfleet-agent"
COORDINATOR_USER = "coordinator"


def mosquitto_password_line(user: str, password: str, *, salt: bytes | None = None, iterations: int = 101) -> str:
    """One line of a Mosquitto 2 password file, as `mosquitto_passwd` writes it ($7$: PBKDF2-SHA512)."""
    salt = os.urandom(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"{user}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def agent_toml(fields: dict[str, str | int]) -> str:
    lines = ["# fedfleet-agent --config agent.toml (written by `fedfleet provision`); paths are relative to this file"]
    for key, value in fields.items():
        lines.append(f"{key} = {value}" if isinstance(value, int) else f"{key} = {_toml_str(value)}")
    return "\n".join(lines) + "\n"


def service_unit(agent_id: str, *, exe: str = AGENT_EXE, install_dir: str = INSTALL_DIR,
                 user: str = SERVICE_USER) -> str:
    """The systemd unit of one agent: restarts forever; writes only to its state and log directories."""
    return f"""[Unit]
Description=fedfleet edge agent {agent_id}
Documentation=https://pypi.org/project/fedfleet/
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User={user}
Group={user}
ExecStart={exe} --config {install_dir}/agent.toml
Restart=always
RestartSec=5
StateDirectory=fedfleet-agent
StateDirectoryMode=0700
LogsDirectory=fedfleet-agent
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=no
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
MemoryMax=1G

[Install]
WantedBy=multi-user.target
"""


def provision(ids: list[str], *, broker: str, secret: bytes, out: Path, fleet: str = "demo",
              coordinator_key_file: str | None = None, ca_certs: str | None = None, broker_users: bool = False,
              profile: str | None = None, runtime: str | None = None, data: str = f"{STATE_DIR}/data.npz",
              state_dir: str = STATE_DIR, log_file: str = LOG_FILE, agent_exe: str = AGENT_EXE,
              install_dir: str = INSTALL_DIR) -> dict[str, Path]:
    """Write OUT/<id>/ for every id (and OUT/broker/ with `broker_users`); returns id -> directory."""
    BrokerURL.parse(broker)  # a malformed URL is a ConfigError now, not on the device later
    for agent in ids:
        if not valid_id(agent):
            raise ConfigError(f"--id {agent!r}: use 1-64 characters of letters, digits, '-', '_' or '.'")
        if agent == COORDINATOR_USER:
            raise ConfigError(f"--id {agent!r} is the coordinator's broker user name; choose another id")
    if not valid_id(fleet):
        raise ConfigError(f"--fleet {fleet!r}: use 1-64 characters of letters, digits, '-', '_' or '.'")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"--id lists an id twice: {ids}")
    pub_text = None
    if coordinator_key_file is not None:
        from fedfleet.edge_agent.config_file import read_public_key

        read_public_key(coordinator_key_file)  # 64 hex digits, or a clear error now
        pub_text = Path(coordinator_key_file).read_text().strip() + "\n"
    if ca_certs is not None and not Path(ca_certs).is_file():
        raise ConfigError(f"--ca-certs {ca_certs}: no such file")
    out.mkdir(parents=True, exist_ok=True)
    passwords: dict[str, str] = {}
    dirs: dict[str, Path] = {}
    for agent in ids:
        d = out / agent
        d.mkdir(parents=True, exist_ok=True)
        _write_private(d / "agent.key", derive_key(secret, agent).hex() + "\n")
        fields: dict[str, str | int] = {"broker": broker, "fleet": fleet, "id": agent, "key_file": "agent.key"}
        if pub_text is not None:
            (d / "coordinator.pub").write_text(pub_text)
            fields["coordinator_key_file"] = "coordinator.pub"
        if ca_certs is not None:
            shutil.copyfile(ca_certs, d / "ca.pem")
            fields["ca_certs"] = "ca.pem"
        if broker_users:
            passwords[agent] = os.urandom(24).hex()
            _write_private(d / "broker.password", passwords[agent] + "\n")
            fields.update(username=agent, password_file="broker.password")
        if profile:
            fields["profile"] = profile
        if runtime:
            fields["runtime"] = runtime
        fields.update(data=data, state_dir=state_dir, log_file=log_file, log_max_bytes=1 << 20, log_backups=3)
        (d / "agent.toml").write_text(agent_toml(fields))
        (d / "fedfleet-agent.service").write_text(service_unit(agent, exe=agent_exe, install_dir=install_dir))
        dirs[agent] = d
    if broker_users:
        from fedfleet.coordinator.broker import acl_text

        b = out / "broker"
        b.mkdir(parents=True, exist_ok=True)
        coordinator_password = os.urandom(24).hex()
        _write_private(b / "coordinator.password", coordinator_password + "\n")
        lines = [mosquitto_password_line(COORDINATOR_USER, coordinator_password)]
        lines += [mosquitto_password_line(agent, pw) for agent, pw in passwords.items()]
        _write_private(b / "passwd", "\n".join(lines) + "\n")
        (b / "acl").write_text(acl_text(COORDINATOR_USER))
    return dirs


def main(argv: list[str]) -> int:
    p = ArgParser(prog="fedfleet provision", description=__doc__.splitlines()[0])
    p.add_argument("--id", required=True, dest="ids", help="an agent id, or a comma-separated roster")
    p.add_argument("--broker", required=True, help="the URL devices connect to (mqtt:// or mqtts://)")
    p.add_argument("--secret-file", required=True, help="the fleet secret (stays on the coordinator host)")
    p.add_argument("--out", required=True, help="one directory per device is written under it")
    p.add_argument("--fleet", default="demo", help="fleet name, the coordinator's (default %(default)s)")
    p.add_argument("--coordinator-key-file", help="coordinator.pub (64 hex digits), copied to each device")
    p.add_argument("--ca-certs", help="the broker's CA file, copied to each device")
    p.add_argument("--broker-users", action="store_true",
                   help="per-device broker passwords, and OUT/broker/{passwd,acl,coordinator.password}")
    p.add_argument("--profile", help="firmware profile name, e.g. rpi4b")
    p.add_argument("--runtime", choices=("onnxruntime", "litert"), help="the device's inference runtime (default: the profile's, else onnxruntime)")
    p.add_argument("--data", default=f"{STATE_DIR}/data.npz", help="the local data file's path on the device")
    p.add_argument("--state-dir", default=STATE_DIR, help="the agent's state directory on the device (default %(default)s)")
    p.add_argument("--log-file", default=LOG_FILE, help="the agent's log file on the device (default %(default)s)")
    p.add_argument("--agent-exe", default=AGENT_EXE, help="fedfleet-agent's path on the device")
    args = p.parse_args(argv)
    from fedfleet.coordinator.cli import _read_secret

    ids = [a.strip() for a in args.ids.split(",") if a.strip()]
    if not ids:
        raise FedfleetError("--id: give at least one agent id")
    dirs = provision(ids, broker=args.broker, secret=_read_secret(args.secret_file), out=Path(args.out),
                     fleet=args.fleet, coordinator_key_file=args.coordinator_key_file, ca_certs=args.ca_certs,
                     broker_users=args.broker_users, profile=args.profile, runtime=args.runtime, data=args.data,
                     state_dir=args.state_dir, log_file=args.log_file, agent_exe=args.agent_exe)
    for agent, d in dirs.items():
        print(f"{agent} {d}")
    if args.broker_users:
        print(f"broker {Path(args.out) / 'broker'}")
    return 0
