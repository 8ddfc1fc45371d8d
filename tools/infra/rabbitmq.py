"""A RabbitMQ cluster with the MQTT plugin on loopback: several nodes on one machine, like the Mosquitto
launcher in coordinator/broker.py but clustered.

    with RabbitCluster(nodes=3) as cluster:
        cluster.urls      # ["mqtt://127.0.0.1:P0", "mqtt://127.0.0.1:P1", ...], one MQTT listener per node
        cluster.url       # the first node's

Uses Debian's `rabbitmq-server` (3.10 here) from /usr/lib/rabbitmq/bin. Each node gets a distinct node
name (`ff<token>-<i>@localhost`), its own AMQP, distribution and MQTT ports (free loopback ports), and
its own directory for the database, logs and config under one temporary base directory; every node
shares one Erlang cookie (HOME of that base). When run as root the nodes run as the `rabbitmq` user, so
the base directory is handed to it. Nodes 1.. join node 0 (`rabbitmqctl join_cluster`). MQTT is
anonymous on loopback (the `guest` user; `loopback_users = none` is safe because the listeners bind
127.0.0.1 only).

Differences from Mosquitto that fedfleet must live with: retained messages are kept per node (the
default DETS store), so an agent on another node than the publisher does not see a retained model
package; the coordinator therefore delivers the package live, and again to agents that come online
without it (coordinator/engine/presence.py), never by a retained copy alone.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from fedfleet.coordinator.broker import Broker, free_port, wait_for_port
from fedfleet.edge_agent.errors import ConfigError

BIN = Path("/usr/lib/rabbitmq/bin")


def _conf(mqtt_port: int, amqp_port: int) -> str:
    return "\n".join([
        f"listeners.tcp.default = 127.0.0.1:{amqp_port}",
        f"mqtt.listeners.tcp.default = 127.0.0.1:{mqtt_port}",
        "mqtt.allow_anonymous = true",
        "mqtt.default_user = guest",
        "mqtt.default_pass = guest",
        "mqtt.vhost = /",
        "mqtt.exchange = amq.topic",
        "mqtt.tcp_listen_options.nodelay = true",
        "mqtt.tcp_listen_options.backlog = 4096",
        "loopback_users = none",
        "log.console = false",
        "log.file.level = warning",
        "vm_memory_high_watermark.absolute = 3GB",  # 1,000 MQTT connections cost a node ~300 MB
        "disk_free_limit.absolute = 50MB",
    ]) + "\n"


class RabbitNode:
    def __init__(self, base: Path, token: str, index: int) -> None:
        self.name = f"ff{token}-{index}@localhost"
        self.dir = base / f"node{index}"
        self.mqtt_port, self.amqp_port, self.dist_port = free_port(), free_port(), free_port()
        self.dir.mkdir(parents=True)
        (self.dir / "rabbitmq.conf").write_text(_conf(self.mqtt_port, self.amqp_port))
        (self.dir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        self.env = {
            **os.environ, "HOME": str(base), "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.amqp_port), "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"), "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"), "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
        }
        (self.dir / "advanced.config").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"mqtt://127.0.0.1:{self.mqtt_port}"


class RabbitCluster(Broker):
    kind = "rabbitmq"

    def __init__(self, nodes: int = 3, *, timeout_s: float = 240.0) -> None:
        if not (BIN / "rabbitmq-server").exists():
            raise ConfigError("rabbitmq-server is not installed: `apt-get install -y rabbitmq-server`")
        if nodes < 1:
            raise ConfigError(f"a cluster needs at least one node, got {nodes}")
        self._base = Path(tempfile.mkdtemp(prefix="fedfleet-rabbitmq-"))
        token = secrets.token_hex(3)
        cookie = self._base / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)
        self._user = None
        if os.geteuid() == 0:  # run the nodes as the rabbitmq user, in directories it owns
            try:
                self._user = pwd.getpwnam("rabbitmq")
            except KeyError:
                self._user = None
        self.nodes = [RabbitNode(self._base, token, i) for i in range(nodes)]
        if self._user is not None:
            self._base.chmod(0o755)
            for path in [self._base, *self._base.rglob("*")]:
                os.chown(path, self._user.pw_uid, self._user.pw_gid)
        try:
            for node in self.nodes:
                log = open(node.dir / "server.out", "wb")  # noqa: SIM115
                node.proc = subprocess.Popen(self._as_user([str(BIN / "rabbitmq-server")]), env=node.env,
                                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                             cwd=self._base)
            deadline = time.monotonic() + timeout_s
            for node in self.nodes:
                self._await(node, deadline)
            for node in self.nodes[1:]:
                self.ctl(node, "stop_app")
                self.ctl(node, "join_cluster", self.nodes[0].name)
                self.ctl(node, "start_app", timeout_s=timeout_s)
            for node in self.nodes:
                wait_for_port(node.mqtt_port, timeout_s, node.proc)
        except Exception as exc:
            logs = "\n".join(f"--- {n.name}:\n{(n.dir / 'server.out').read_text(errors='replace')[-1500:]}"
                             for n in self.nodes if (n.dir / "server.out").exists())
            self.stop()
            raise RuntimeError(f"the RabbitMQ cluster did not start: {exc}\n{logs}") from None
        self.urls = [n.url for n in self.nodes]
        super().__init__(self.urls[0])

    def _await(self, node: RabbitNode, deadline: float) -> None:
        """Until the node has booted: `await_startup` fails at once while the node is not yet registered."""
        while True:
            try:
                self.ctl(node, "await_startup", timeout_s=max(5.0, deadline - time.monotonic()))
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                if node.proc is not None and node.proc.poll() is not None:
                    raise RuntimeError(f"node {node.name} exited with code {node.proc.returncode}") from None
                if time.monotonic() >= deadline:
                    raise
                time.sleep(2.0)

    def _as_user(self, argv: list[str]) -> list[str]:
        if self._user is None:
            return argv
        return ["setpriv", f"--reuid={self._user.pw_uid}", f"--regid={self._user.pw_gid}", "--init-groups", *argv]

    def ctl(self, node: RabbitNode, *args: str, timeout_s: float = 120.0) -> str:
        # run in the cluster's own directory: Erlang looks up modules in its working directory first, and a
        # directory its user cannot read (a private checkout) prints an error report into the output
        p = subprocess.run(self._as_user([str(BIN / "rabbitmqctl"), "-n", node.name, *args]), env=node.env,
                           capture_output=True, text=True, timeout=timeout_s + 30, cwd=self._base)
        if p.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {node.name} failed: {p.stdout[-800:]} {p.stderr[-800:]}")
        return p.stdout

    def running_nodes(self) -> list[str]:
        """The cluster's running node names, as node 0 sees them."""
        import json

        out = self.ctl(self.nodes[0], "cluster_status", "--formatter", "json")
        lines = [line for line in out.splitlines() if line.startswith("{")]  # the JSON, past any Erlang report
        if not lines:
            raise RuntimeError(f"rabbitmqctl cluster_status printed no JSON: {out[-800:]}")
        return sorted(json.loads(lines[-1]).get("running_nodes", []))

    @property
    def pids(self) -> list[int]:
        return [n.proc.pid for n in self.nodes if n.proc is not None]

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.proc is not None and node.proc.poll() is None:
                try:
                    self.ctl(node, "stop", timeout_s=60)
                except (RuntimeError, subprocess.TimeoutExpired):
                    pass
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(node.proc.pid, 9)
                node.proc.wait(10)
        shutil.rmtree(self._base, ignore_errors=True)
