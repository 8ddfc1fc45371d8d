"""Broker launchers: Mosquitto from a generated config, the embedded amqtt broker, the in-process memory broker,
or an external URL.

`start_broker("embedded" | "mosquitto" | "memory" | "mqtt://host:port")` returns a `Broker` with `.url`, `.kind`
and `.stop()` (also a context manager). "memory" is `fedfleet.edge_agent.wire.memory.MemoryBroker`: no sockets,
URL `memory://<name>`, reachable only from this process (agents and coordinator in one process). Mosquitto listens on a free loopback port with `set_tcp_nodelay true`; its
config can add password and ACL files so each agent may publish only under its own id, and TLS
(`tls=TLSFiles(...)`, e.g. from `fedfleet.coordinator.tls.make_local_ca`), which makes the URL `mqtts://`.
"""

from __future__ import annotations

import asyncio
import base64
import grp
import hashlib
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from fedfleet.coordinator.safe_files import check_text, make_dir, write_file
from fedfleet.coordinator.tls import TLSFiles
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.wire.memory import MemoryBroker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"broker exited with code {proc.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


class Broker:
    kind = "external"

    def __init__(self, url: str) -> None:
        self.url = url

    def stop(self) -> None:
        """An external broker is not ours to stop."""

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def broker_user() -> str:
    """The user Mosquitto runs as. Started as root it drops to Debian's unprivileged `mosquitto` user (or
    `nobody`); started as anyone else it stays that user (Mosquitto ignores `user` then)."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    for name in ("mosquitto", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise ConfigError("no unprivileged user to run mosquitto as: create the 'mosquitto' user (apt-get install mosquitto)")


def mosquitto_executable() -> str:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        raise ConfigError("mosquitto is not installed: `apt-get install -y mosquitto`, or use --broker embedded")
    return exe


def _die_with_parent() -> None:
    """In the child before exec (Linux): Mosquitto gets SIGTERM when the thread that started it ends, even by
    SIGKILL of the process. Used from the main thread only (the signal follows the starting thread). The
    kernel clears it when Mosquitto started as root drops to its own user, so there it only covers a
    broker run as an unprivileged user; SIGTERM, SIGINT and SIGHUP are passed on in every case."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def mosquitto_password_line(user: str, password: str, *, salt: bytes | None = None, iterations: int = 101) -> str:
    """One line of a Mosquitto 2 password file, as `mosquitto_passwd` writes it ($7$: PBKDF2-SHA512)."""
    salt = os.urandom(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"{user}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def mosquitto_config(port: int, *, password_file: Path | None = None, acl_file: Path | None = None,
                     max_packet_bytes: int = 2 << 20, tls: TLSFiles | None = None, user: str | None = None,
                     extra: str = "", bind: str | None = "127.0.0.1") -> str:
    """The broker's config. With a password file, client ids are the user names
    (`use_username_as_clientid`): a client cannot take over another's session by picking its id.
    `extra`: more mosquitto.conf lines; `bind`: the listener's address (None: every interface)."""
    lines = [f"listener {port} {bind}" if bind else f"listener {port}"]
    if tls is not None:  # this listener speaks TLS only (mqtts://)
        lines += [f"cafile {tls.cafile}", f"certfile {tls.certfile}", f"keyfile {tls.keyfile}",
                  "tls_version tlsv1.2"]
    lines += [
        "set_tcp_nodelay true",
        "persistence false",
        f"max_packet_size {max_packet_bytes}",
        "max_inflight_messages 100",
        "max_queued_messages 100000",
        "log_type error",
        "log_type warning",
        "log_dest stderr",
    ]
    if password_file is not None:
        lines += ["allow_anonymous false", f"password_file {password_file}", "use_username_as_clientid true"]
    else:
        lines.append("allow_anonymous true")
    if acl_file is not None:
        lines.append(f"acl_file {acl_file}")
    lines.append(f"user {user or broker_user()}")
    return "\n".join(lines) + "\n" + extra


def acl_text(coordinator_user: str, agents: Iterable[str] = ()) -> str:
    """Agents (user name = agent id) may write only under their own id and read their own task and the
    broadcasts; the coordinator reads and writes all. The broadcast read is granted per agent (`user` then
    `topic`): as a `pattern` it would hold no `%u`, which Mosquitto warns about ("does not contain '%c' or
    '%u'"), and every authenticated client would get it."""
    text = (
        f"user {coordinator_user}\ntopic readwrite fedfleet/#\n\n"
        "pattern write fedfleet/v1/+/agents/%u/status\n"
        "pattern write fedfleet/v1/+/agents/%u/result\n"
        "pattern write fedfleet/v1/+/agents/%u/telemetry\n"
        "pattern read fedfleet/v1/+/agents/%u/task\n"
    )
    for agent in agents:
        if agent != coordinator_user:
            text += f"\nuser {check_text(agent, 'agent id')}\ntopic read fedfleet/v1/+/broadcast/#\n"
    return text


def write_broker_dir(directory: str | Path, *, port: int, users: dict[str, str] | None = None,
                     coordinator_user: str = "coordinator", tls: TLSFiles | None = None,
                     bind: str | None = None, write_config: bool = True) -> Path:
    """A directory Mosquitto runs as written (`mosquitto -c DIR/mosquitto.conf`, or `fedfleet broker --dir DIR`):
    `mosquitto.conf` (absolute paths), with `users` the `passwd` file (PBKDF2-SHA512, Mosquitto's own format,
    0600) and the `acl`, and with `tls` the CA, certificate and key (already in the directory, or copied into
    it). Run as root, the files Mosquitto reads are given to the user it drops to (`broker_user()`).
    `write_config=False`: only the passwd and acl files (for a broker configured by hand)."""
    d = make_dir(directory, "broker directory").resolve()
    pw = acl = None
    if users:
        lines = [mosquitto_password_line(check_text(u, "broker user"), p) for u, p in users.items()]
        pw = write_file(d / "passwd", "\n".join(lines) + "\n", secret=True, replace=True)
        acl = write_file(d / "acl", acl_text(coordinator_user, users), replace=True)
    if tls is not None:
        placed = []
        for f, secret in ((tls.cafile, False), (tls.certfile, False), (tls.keyfile, True)):
            f = Path(f).resolve()
            if f.parent != d:
                f = write_file(d / f.name, f.read_bytes(), secret=secret, replace=True)
            placed.append(f)
        tls = TLSFiles(*placed)
    user = broker_user()
    conf = d / "mosquitto.conf"
    if write_config:
        write_file(conf, mosquitto_config(port, password_file=pw, acl_file=acl, tls=tls, user=user, bind=bind),
                   replace=True)
    if os.geteuid() == 0:
        entry = pwd.getpwnam(user)
        for f in [d, conf, pw, acl, *((tls.cafile, tls.certfile, tls.keyfile) if tls else ())]:
            if f is not None and f.exists():
                os.chown(f, entry.pw_uid, entry.pw_gid)
    return conf


FILE_KEYS = ("cafile", "certfile", "keyfile", "password_file", "acl_file")  # mosquitto.conf lines naming files


def _reachable_by(path: Path, user: str) -> bool:
    """Whether `user` may open `path`: every directory above it searchable and the file readable by that user."""
    entry = pwd.getpwnam(user)
    groups = {entry.pw_gid, *(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)}

    def allows(st: os.stat_result, bits: int) -> bool:
        if st.st_uid == entry.pw_uid:
            return bool(st.st_mode & (bits << 6))
        if st.st_gid in groups:
            return bool(st.st_mode & (bits << 3))
        return bool(st.st_mode & bits)

    path = path.resolve()
    try:
        return all(allows(os.stat(d), 1) for d in path.parents) and allows(os.stat(path), 4)
    except OSError:
        return False


def run_broker_dir(directory: str | Path) -> int:
    """Run Mosquitto on DIR/mosquitto.conf in the foreground until SIGTERM, SIGINT or SIGHUP, which are passed on
    to it; returns once it has exited (its exit code; 0 after a clean stop). Started as root, Mosquitto drops
    to its own user: if that user cannot reach the files (a directory under /root, say), it runs from a
    private copy of them (mode 0700, owned by that user, removed afterwards)."""
    conf = Path(directory) / "mosquitto.conf"
    if not conf.is_file():
        raise ConfigError(f"--dir {directory}: no mosquitto.conf (write one with `fedfleet provision ... --out DIR`)")
    conf = conf.resolve()
    exe = mosquitto_executable()
    user = broker_user()
    lines = conf.read_text().splitlines()
    named = [parts for parts in (line.split(None, 1) for line in lines) if len(parts) == 2 and parts[0] in FILE_KEYS]
    files = [Path(value) for _, value in named]
    if os.geteuid() != 0 or all(_reachable_by(f, user) for f in [conf, *files]):
        return run_foreground([exe, "-c", str(conf)])
    stage = Path(tempfile.mkdtemp(prefix="fedfleet-broker-"))
    try:
        out = []
        for line in lines:
            parts = line.split(None, 1)
            if len(parts) == 2 and parts[0] in FILE_KEYS:
                copy = stage / Path(parts[1]).name
                shutil.copy2(parts[1], copy)
                line = f"{parts[0]} {copy}"
            out.append(line)
        (stage / "mosquitto.conf").write_text("\n".join(out) + "\n")
        _give_to(stage, user)
        return run_foreground([exe, "-c", str(stage / "mosquitto.conf")])
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def run_foreground(cmd: list[str], on_start: object = None) -> int:
    """Start `cmd`, pass SIGTERM/SIGINT/SIGHUP on to it, wait for it to exit, return its code (0 after a
    stop we passed on). The handlers are in place before the child exists: no signal can orphan it."""
    state: dict[str, object] = {"proc": None, "stopping": False}

    def forward(signum: int, frame: object) -> None:
        state["stopping"] = True
        proc = state["proc"]
        if isinstance(proc, subprocess.Popen) and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        proc = state["proc"] = subprocess.Popen(cmd, preexec_fn=_die_with_parent)  # noqa: PLW1509
        if state["stopping"]:
            proc.send_signal(signal.SIGTERM)
        if callable(on_start):
            try:
                on_start(proc)
            except BaseException:
                proc.terminate()
                proc.wait(10)
                raise
        while True:
            try:
                rc = proc.wait(timeout=10 if state["stopping"] else None)
                break
            except subprocess.TimeoutExpired:
                proc.kill()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 0 if state["stopping"] and rc in (0, -signal.SIGTERM) else rc


def _give_to(directory: Path, user: str) -> None:
    """Make the broker's files (config, passwords, ACL, TLS key) readable by the user it runs as, and only by it."""
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    for path in [directory, *directory.rglob("*")]:
        os.chown(path, entry.pw_uid, entry.pw_gid)


class MosquittoBroker(Broker):
    kind = "mosquitto"

    def __init__(self, port: int | None = None, *, users: dict[str, str] | None = None,
                 coordinator_user: str = "coordinator", tls: TLSFiles | None = None,
                 password_file: Path | None = None, acl_file: Path | None = None, extra_config: str = "") -> None:
        """`password_file`/`acl_file`: ready-made files (e.g. from `fedfleet provision --broker-users`), used
        when `users` is not given; `extra_config`: more mosquitto.conf lines (e.g. `sys_interval 1`)."""
        exe = mosquitto_executable()
        self.port = port or free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="fedfleet-mosquitto-"))
        pw, acl = password_file, acl_file
        if users:
            pw = write_file(self._dir / "passwd", "".join(mosquitto_password_line(u, p) + "\n"
                                                          for u, p in users.items()), secret=True)
            acl = write_file(self._dir / "acl", acl_text(coordinator_user, users))
        else:  # given files (e.g. `fedfleet provision`'s, 0600): private copies the broker's user can read
            pw = Path(shutil.copy(pw, self._dir / "passwd")) if pw is not None else None
            acl = Path(shutil.copy(acl, self._dir / "acl")) if acl is not None else None
        if tls is not None:  # private copies the broker's user can read (the originals may be root's alone)
            (self._dir / "tls").mkdir()
            tls = TLSFiles(*(Path(shutil.copy(f, self._dir / "tls" / Path(f).name))
                             for f in (tls.cafile, tls.certfile, tls.keyfile)))
        user = broker_user()
        conf = self._dir / "mosquitto.conf"
        conf.write_text(mosquitto_config(self.port, password_file=pw, acl_file=acl, tls=tls, user=user,
                                         extra=extra_config))
        _give_to(self._dir, user)
        self._log = open(self._dir / "mosquitto.log", "wb")  # noqa: SIM115
        self._proc = subprocess.Popen([exe, "-c", str(conf)], stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, 10.0, self._proc)
        except Exception as exc:
            self.stop()
            log_text = (self._dir / "mosquitto.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"mosquitto did not start: {exc}\n{log_text}") from None
        super().__init__(f"{'mqtts' if tls else 'mqtt'}://127.0.0.1:{self.port}")

    @property
    def pid(self) -> int:
        return self._proc.pid

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class EmbeddedBroker(Broker):
    """amqtt, in-process on its own event-loop thread. MQTT 3.1.1 only; fine for demos."""

    kind = "embedded"

    def __init__(self, port: int | None = None) -> None:
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.port = port or free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._broker = None
        self._thread = threading.Thread(target=self._serve, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(15) or self._error is not None:
            raise RuntimeError(f"embedded broker did not start: {self._error}")
        super().__init__(f"mqtt://127.0.0.1:{self.port}")

    def _serve(self) -> None:
        from amqtt.broker import Broker as AmqttBroker

        asyncio.set_event_loop(self._loop)
        # amqtt 0.12 can raise from its own session bookkeeping when many clients leave at once
        # ("dictionary changed size during iteration"); the clients are gone either way, so keep it quiet
        self._loop.set_exception_handler(
            lambda loop, ctx: logging.getLogger(__name__).debug("embedded broker: %s", ctx.get("message"))
        )
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}", "max_connections": 0}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

        async def boot() -> None:
            self._broker = AmqttBroker(config)
            await self._broker.start()

        try:
            self._loop.run_until_complete(boot())
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        if self._broker is not None and self._loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
            try:
                fut.result(10)
            except Exception:  # noqa: BLE001 - best effort
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


class InMemoryBroker(Broker):
    """The in-process broker (fedfleet.edge_agent.wire.memory): MQTT semantics without sockets, for one process."""

    kind = "memory"

    def __init__(self, name: str | None = None) -> None:
        self.broker = MemoryBroker(name)
        super().__init__(self.broker.url)

    def stop(self) -> None:
        self.broker.close()


def start_broker(spec: str) -> Broker:
    """`embedded` (default for demos), `mosquitto`, `memory` (in-process, no sockets), or an external
    `mqtt://host:port` URL."""
    if spec == "embedded":
        return EmbeddedBroker()
    if spec == "memory":
        return InMemoryBroker()
    if spec == "mosquitto":
        return MosquittoBroker()
    if spec.startswith(("mqtt://", "mqtts://")):
        return Broker(spec)
    raise ConfigError(f"--broker must be 'embedded', 'mosquitto', 'memory' or a mqtt:// URL, got {spec!r}")
