"""`fedfleet provision`: everything the devices and the broker need to run a fleet, one directory each.

    fedfleet provision --id pi-07,pi-08 --broker mqtts://coordinator.lan:8883 --secret-file fleet.secret \
        --coordinator-key-file coordinator.pub --tls-ca ca --broker-users --out devices [--fleet lab] \
        [--profile rpi4b] [--runtime onnxruntime] [--data PATH] [--state-dir PATH] [--log-file PATH]

`--id` takes one id or a comma-separated roster. For each id, `OUT/<id>/` gets:
- `agent.key` (0600): the agent's own key, derived from the fleet secret (which stays on the coordinator);
- `coordinator.pub`: a copy of the coordinator's Ed25519 public key (64 hex digits), pinned by the agent;
- `ca.pem`: the broker's CA certificate, for mqtts:// (`--tls-ca`, or `--ca-certs` for a CA of your own);
- `broker.password` (0600), with `--broker-users`: the agent's broker password (user name = agent id);
- `agent.toml`: what `fedfleet-agent --config` reads (edge_agent/config_file.py); paths relative to it;
- `fedfleet-agent.service`: a systemd unit (Restart=always, a dedicated user, NoNewPrivileges,
  ProtectSystem=strict, StateDirectory and LogsDirectory as the only writable places);
- `install.sh`: run as root on the device beside the copied wheel (and `<id>.npz` from `fedfleet shards`): a
  virtual environment in /opt/fedfleet with `fedfleet[edge]`, the service user, the files, the unit, started.
`OUT/broker/` is a directory Mosquitto runs as written (`fedfleet broker --dir OUT/broker`): `mosquitto.conf`
listening on the broker URL's port on every interface; with `--broker-users` the `passwd` file
(PBKDF2-SHA512, Mosquitto's own format, 0600), the `acl` (each agent writes only under its own id) and the
coordinator's `coordinator.password` (0600, for `fedfleet serve --username coordinator --password-file`);
with `--tls-ca DIR` the server certificate for the URL's host, signed by the CA in DIR (made there by
`fedfleet tls ca` if DIR does not exist yet). Files are written without following symlinks, secrets 0600;
ids and paths with control characters are refused. Nothing secret is ever printed or put on a command line.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from fedfleet.coordinator.broker import mosquitto_password_line, write_broker_dir  # noqa: F401 - re-exported
from fedfleet.coordinator.safe_files import check_text, make_dir, write_file
from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.edge_agent.errors import ConfigError, FedfleetError
from fedfleet.edge_agent.wire.mqtt import BrokerURL
from fedfleet.edge_agent.wire.protocol import derive_key, valid_id

INSTALL_DIR = "/etc/fedfleet-agent"  # where install.sh puts OUT/<id>/ on the device
STATE_DIR = "/var/lib/fedfleet-agent"
LOG_FILE = "/var/log/fedfleet-agent/agent.log"
VENV = "/opt/fedfleet"
AGENT_EXE = f"{VENV}/bin/fedfleet-agent"
SERVICE_USER = "fedfleet-agent"
COORDINATOR_USER = "coordinator"


def _write_private(path: Path, text: str) -> None:
    write_file(path, text, secret=True, replace=True)


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def agent_toml(fields: dict[str, str | int]) -> str:
    lines = ["# fedfleet-agent --config agent.toml (written by `fedfleet provision`); paths are relative to this file"]
    for key, value in fields.items():
        lines.append(f"{key} = {value}" if isinstance(value, int) else f"{key} = {_toml_str(value)}")
    return "\n".join(lines) + "\n"


def service_unit(agent_id: str, *, exe: str = AGENT_EXE, install_dir: str = INSTALL_DIR,
                 user: str = SERVICE_USER, writable: tuple[str, ...] = ()) -> str:
    """The systemd unit of one agent: restarts forever; writes only to its state and log directories
    (`writable`: more directories, for a state or log directory outside /var/lib and /var/log)."""
    extra = "".join(f"ReadWritePaths={p}\n" for p in writable)
    return f"""[Unit]
Description=fedfleet edge agent {agent_id}
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
{extra}NoNewPrivileges=yes
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


def install_script(agent_id: str, *, install_dir: str = INSTALL_DIR, state_dir: str = STATE_DIR,
                   data: str = f"{STATE_DIR}/data.npz", user: str = SERVICE_USER, venv: str = VENV) -> str:
    """`install.sh`: run as root on the device, in the directory that holds the copied `<id>/`, the fedfleet
    wheel and (optionally) `<id>.npz`."""
    q = shlex.quote
    return f"""#!/bin/sh
# Installs fedfleet-agent {agent_id} as a systemd service (written by `fedfleet provision`).
# Run as root from the directory holding {agent_id}/, fedfleet-*-py3-none-any.whl and {agent_id}.npz:
#     sudo sh {agent_id}/install.sh
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."
set -- fedfleet-*-py3-none-any.whl
[ -f "$1" ] && [ $# -eq 1 ] || {{ echo "install.sh: put exactly one fedfleet-*-py3-none-any.whl beside {agent_id}/" >&2; exit 2; }}
python3 -m venv {q(venv)}
{q(venv)}/bin/pip install --quiet "./$1[edge]"
id -u {q(user)} >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin {q(user)}
install -d -m 0750 -o root -g {q(user)} {q(install_dir)}
for f in agent.toml agent.key coordinator.pub ca.pem broker.password; do
    [ ! -f "$here/$f" ] || install -m 0640 -o root -g {q(user)} "$here/$f" {q(install_dir)}/
done
install -d -m 0700 -o {q(user)} -g {q(user)} {q(state_dir)}
[ ! -f {q(agent_id + ".npz")} ] || install -D -m 0600 -o {q(user)} -g {q(user)} {q(agent_id + ".npz")} {q(data)}
install -m 0644 "$here/fedfleet-agent.service" /etc/systemd/system/fedfleet-agent.service
systemctl daemon-reload
systemctl enable --now fedfleet-agent
echo "fedfleet-agent {agent_id} installed and started: journalctl -u fedfleet-agent, {LOG_FILE}"
"""


def _check_path(value: str, what: str, *, spaces: bool = True) -> str:
    check_text(value, what)
    if not spaces and any(c.isspace() for c in value):
        raise ConfigError(f"{what} {value[:60]!r} holds white space, which a systemd unit line cannot carry; refused")
    return value


def provision(ids: list[str], *, broker: str, secret: bytes, out: Path, fleet: str = "demo",
              coordinator_key_file: str | None = None, ca_certs: str | None = None, broker_users: bool = False,
              tls_ca: str | None = None, profile: str | None = None, runtime: str | None = None,
              data: str = f"{STATE_DIR}/data.npz", state_dir: str = STATE_DIR, log_file: str = LOG_FILE,
              agent_exe: str = AGENT_EXE, install_dir: str = INSTALL_DIR) -> dict[str, Path]:
    """Write OUT/<id>/ for every id and OUT/broker/; returns id -> directory."""
    for value, what in ((data, "--data"), (state_dir, "--state-dir"), (log_file, "--log-file"),
                        (agent_exe, "--agent-exe"), (install_dir, "install dir"), (str(out), "--out"),
                        (broker, "--broker"), (profile or "", "--profile"), (ca_certs or "", "--ca-certs"),
                        (tls_ca or "", "--tls-ca"), (coordinator_key_file or "", "--coordinator-key-file")):
        _check_path(value, what, spaces=what not in ("--agent-exe", "install dir", "--state-dir", "--log-file"))
    url = BrokerURL.parse(broker)  # a malformed URL is a ConfigError now, not on the device later
    for agent in ids:
        check_text(agent, "--id")
        if not valid_id(agent):
            raise ConfigError(f"--id {agent!r}: use 1-64 characters of letters, digits, '-', '_' or '.'")
        if agent in (COORDINATOR_USER, "broker"):
            raise ConfigError(f"--id {agent!r} is reserved (the coordinator's broker user, the broker's directory); "
                              "choose another id")
    if not valid_id(fleet):
        raise ConfigError(f"--fleet {fleet!r}: use 1-64 characters of letters, digits, '-', '_' or '.'")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"--id lists an id twice: {ids}")
    if tls_ca and ca_certs:
        raise ConfigError("give --tls-ca (a CA of fedfleet's, which also signs the broker's certificate) or "
                          "--ca-certs (a CA file of your own), not both")
    if tls_ca and not url.tls:
        raise ConfigError(f"--tls-ca needs an mqtts:// --broker URL, got {broker}")
    pub_text = None
    if coordinator_key_file is not None:
        from fedfleet.edge_agent.config_file import read_public_key

        read_public_key(coordinator_key_file)  # 64 hex digits, or a clear error now
        pub_text = Path(coordinator_key_file).read_text().strip() + "\n"
    if ca_certs is not None and not Path(ca_certs).is_file():
        raise ConfigError(f"--ca-certs {ca_certs}: no such file")
    tls = None
    if tls_ca:
        from fedfleet.coordinator.tls import make_ca, make_server_cert

        if not Path(tls_ca).exists():
            make_ca(tls_ca)
        tls = make_server_cert(tls_ca, [url.host], out / "broker", name="server")
        ca_certs = str(tls.cafile)
    make_dir(out, "--out")
    passwords: dict[str, str] = {}
    dirs: dict[str, Path] = {}
    writable = tuple(sorted({os.path.dirname(log_file.rstrip("/")), state_dir} -
                            {STATE_DIR, os.path.dirname(LOG_FILE)}))
    for agent in ids:
        d = make_dir(out / agent, "--out")
        _write_private(d / "agent.key", derive_key(secret, agent).hex() + "\n")
        fields: dict[str, str | int] = {"broker": broker, "fleet": fleet, "id": agent, "key_file": "agent.key"}
        if pub_text is not None:
            write_file(d / "coordinator.pub", pub_text, replace=True)
            fields["coordinator_key_file"] = "coordinator.pub"
        if ca_certs is not None:
            write_file(d / "ca.pem", Path(ca_certs).read_bytes(), replace=True)
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
        write_file(d / "agent.toml", agent_toml(fields), replace=True)
        write_file(d / "fedfleet-agent.service",
                   service_unit(agent, exe=agent_exe, install_dir=install_dir, writable=writable), replace=True)
        write_file(d / "install.sh", install_script(agent, install_dir=install_dir, state_dir=state_dir, data=data),
                   replace=True, mode=0o755)
        dirs[agent] = d
    users = None
    if broker_users:
        coordinator_password = os.urandom(24).hex()
        make_dir(out / "broker", "--out")
        _write_private(out / "broker" / "coordinator.password", coordinator_password + "\n")
        users = {COORDINATOR_USER: coordinator_password, **passwords}
    if tls is not None or not url.tls:  # an mqtts:// URL with a CA of your own: bring the broker's certificate
        write_broker_dir(out / "broker", port=url.port, users=users, coordinator_user=COORDINATOR_USER, tls=tls)
    elif users:
        write_broker_dir(out / "broker", port=url.port, users=users, coordinator_user=COORDINATOR_USER,
                         write_config=False)
    return dirs


def main(argv: list[str]) -> int:
    p = ArgParser(prog="fedfleet provision", description=__doc__.splitlines()[0])
    p.add_argument("--id", required=True, dest="ids", help="an agent id, or a comma-separated roster")
    p.add_argument("--broker", required=True, help="the URL devices connect to (mqtt:// or mqtts://)")
    p.add_argument("--secret-file", required=True, help="the fleet secret (stays on the coordinator host)")
    p.add_argument("--out", required=True, help="one directory per device, and broker/, are written under it")
    p.add_argument("--fleet", default="demo", help="fleet name, the coordinator's (default %(default)s)")
    p.add_argument("--coordinator-key-file", help="coordinator.pub (64 hex digits), copied to each device")
    p.add_argument("--tls-ca", metavar="DIR", help="the CA directory of `fedfleet tls ca` (made if missing): "
                   "signs OUT/broker/server.crt for the broker URL's host; its ca.crt goes to each device")
    p.add_argument("--ca-certs", help="a CA file of your own for the broker, copied to each device")
    p.add_argument("--broker-users", action="store_true",
                   help="per-device broker passwords, and OUT/broker/{passwd,acl,coordinator.password}")
    p.add_argument("--profile", help="firmware profile name, e.g. rpi4b")
    p.add_argument("--runtime", choices=("onnxruntime", "litert"), help="the device's inference runtime (default: the profile's, else onnxruntime)")
    p.add_argument("--data", default=f"{STATE_DIR}/data.npz", help="the local data file's path on the device")
    p.add_argument("--state-dir", default=STATE_DIR, help=f"the agent's state directory (default {STATE_DIR})")
    p.add_argument("--log-file", default=LOG_FILE, help=f"the agent's log file (default {LOG_FILE})")
    p.add_argument("--agent-exe", default=AGENT_EXE, help=f"fedfleet-agent's path on the device (default {AGENT_EXE})")
    args = p.parse_args(argv)
    from fedfleet.coordinator.cli import _read_secret

    ids = [a.strip() for a in args.ids.split(",") if a.strip()]
    if not ids:
        raise FedfleetError("--id: give at least one agent id")
    dirs = provision(ids, broker=args.broker, secret=_read_secret(args.secret_file), out=Path(args.out),
                     fleet=args.fleet, coordinator_key_file=args.coordinator_key_file, ca_certs=args.ca_certs,
                     broker_users=args.broker_users, tls_ca=args.tls_ca, profile=args.profile, runtime=args.runtime,
                     data=args.data, state_dir=args.state_dir, log_file=args.log_file, agent_exe=args.agent_exe)
    for agent, d in dirs.items():
        print(f"{agent} {d}")
    if (Path(args.out) / "broker").is_dir():
        print(f"broker {Path(args.out) / 'broker'}")
    return 0
