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
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

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


def mosquitto_config(port: int, *, password_file: Path | None = None, acl_file: Path | None = None,
                     max_packet_bytes: int = 2 << 20, tls: TLSFiles | None = None, user: str | None = None,
                     extra: str = "") -> str:
    """The broker's config. With a password file, client ids are the user names
    (`use_username_as_clientid`): a client cannot take over another's session by picking its id.
    `extra`: more mosquitto.conf lines."""
    lines = [f"listener {port} 127.0.0.1"]
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


def acl_text(coordinator_user: str) -> str:
    """Agents (user name = agent id) may write only under their own id; the coordinator reads and writes all."""
    return (
        f"user {coordinator_user}\ntopic readwrite fedfleet/#\n\n"
        "pattern write fedfleet/v1/+/agents/%u/status\n"
        "pattern write fedfleet/v1/+/agents/%u/result\n"
        "pattern write fedfleet/v1/+/agents/%u/telemetry\n"
        "pattern read fedfleet/v1/+/agents/%u/task\n"
        "pattern read fedfleet/v1/+/broadcast/#\n"
    )


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
        exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if exe is None:
            raise ConfigError("mosquitto is not installed: `apt-get install -y mosquitto`, or use --broker embedded")
        self.port = port or free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="fedfleet-mosquitto-"))
        pw, acl = password_file, acl_file
        if users:
            pw = self._dir / "passwd"
            pw.write_text("")
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), user, password], check=True,
                               capture_output=True)
            acl = self._dir / "acl"
            acl.write_text(acl_text(coordinator_user))
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


class SnapshotDict(dict):
    """A dict whose iteration (plain and `items()`) walks a snapshot, so it may change during the loop."""

    def __iter__(self):  # noqa: ANN204
        return iter(list(super().keys()))

    def items(self):  # noqa: ANN201
        return list(super().items())


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

        class OwnRetained(AmqttBroker):  # type: ignore[misc]
            async def _publish_retained_messages_for_subscription(self, subscription: Any, session: Any) -> None:
                # amqtt 0.12 sends a connecting client the retained messages of every filter any client holds
                # (other agents' statuses, the model package a second time): only the client's own filters
                held = self._subscriptions.get(subscription[0], ())
                if any(s.client_id == session.client_id for s, _ in held):
                    await super()._publish_retained_messages_for_subscription(subscription, session)

        async def boot() -> None:
            self._broker = OwnRetained(config)
            # amqtt 0.12 loops over its subscriptions dict while a connecting client's session starts, awaiting
            # inside the loop; another client subscribing meanwhile raised "dictionary changed size during
            # iteration" and dropped the connecting client, which reconnected: its statuses of the dropped
            # connection then reached the coordinator after the new ones ("replayed" refusals at start-up).
            # Iterating a snapshot keeps every connection.
            self._broker._subscriptions = SnapshotDict(self._broker._subscriptions)
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
