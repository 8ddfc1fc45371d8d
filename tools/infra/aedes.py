"""An aedes MQTT cluster on loopback: N aedes nodes (Node.js) sharing one Redis, started and stopped together.

    with AedesCluster(nodes=2) as cluster:
        cluster.urls      # ["mqtt://127.0.0.1:P0", "mqtt://127.0.0.1:P1"], one MQTT listener per node
        cluster.url       # the first node's
        cluster.pids      # every process of the cluster: the nodes and Redis

    python -m fedfleet.tools.infra.aedes --nodes 2   # the same from a shell: prints the URLs, runs until SIGTERM

Each node is `aedes_node/node.js` (next to this file) on its own free 127.0.0.1 port, with the npm packages
pinned in `aedes_node/package.json` and `package-lock.json` (aedes 1.2.0, aedes-persistence-redis 11.2.2,
mqemitter-redis 7.2.1): mqemitter-redis carries every message between the nodes, aedes-persistence-redis keeps
sessions, subscriptions, retained messages, wills and the QoS 1 messages queued for offline sessions, so a
client may reconnect to any node. Redis is Debian's `redis-server`, started here on a free loopback port in
the cluster's own temporary directory (no persistence to disk, no system service). Start-up returns once
every node has answered an MQTT CONNECT with an accepted CONNACK.

The npm packages are installed on first use (`npm ci`, the lock file's exact versions) into
`$FEDFLEET_AEDES_DIR`, else `$FEDFLEET_CACHE_DIR/aedes`, else `$XDG_CACHE_HOME/fedfleet/aedes`, else
`~/.cache/fedfleet/aedes`, one directory per lock file, and reused afterwards.

Stopping: `stop()` sends SIGTERM to the nodes, then to Redis (SIGKILL after a grace period) and removes the
directory. A launcher that dies without `stop()` (SIGTERM, SIGKILL) takes the cluster with it: each node
exits when its stdin (a pipe held by the launcher) closes, and, started from the main thread, the nodes and
Redis get SIGTERM from the kernel when the launcher exits (PR_SET_PDEATHSIG). The directory such a launcher
leaves (logs only) is removed by the next cluster started by the same user, once none of its processes runs.

Known upstream bug (aedes 1.2.0 with aedes-persistence-redis 11.2.2): a persistent session (clean_session
false) that subscribes to two or more topic filters in ONE SUBSCRIBE packet never gets its SUBACK; one filter
per SUBSCRIBE works. Clients of this cluster with persistent sessions must subscribe one filter at a time
(docs/howto/aedes-cluster.md).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from fedfleet.coordinator.broker import Broker, free_port, wait_for_port
from fedfleet.edge_agent.errors import ConfigError

NODE_DIR = Path(__file__).resolve().parent / "aedes_node"
PINNED = {"aedes": "1.2.0", "aedes-persistence-redis": "11.2.2", "mqemitter-redis": "7.2.1"}
MIN_NODE_MAJOR = 20  # aedes 1.x, aedes-persistence-redis 11 and mqemitter-redis 7 declare node >= 20


def cache_root() -> Path:
    """Where the npm packages are installed (one subdirectory per lock file)."""
    own = os.environ.get("FEDFLEET_AEDES_DIR")
    if own:
        return Path(own)
    base = os.environ.get("FEDFLEET_CACHE_DIR")
    if base:
        return Path(base) / "aedes"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fedfleet" / "aedes"


def _tool(name: str, hint: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise ConfigError(f"{name} is not installed (the aedes cluster needs it): {hint}")
    return exe


def node_executable() -> str:
    """`node`, checked to be new enough for the pinned packages."""
    exe = _tool("node", f"install Node.js >= {MIN_NODE_MAJOR} with npm (Debian 12's own nodejs is 18: too old)")
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        major = int(out.lstrip("v").split(".")[0])
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"{exe} --version did not print a Node.js version: {exc}") from None
    if major < MIN_NODE_MAJOR:
        raise ConfigError(f"node {out} is too old for aedes {PINNED['aedes']}: it needs Node.js >= {MIN_NODE_MAJOR}")
    return exe


def redis_executable() -> str:
    return _tool("redis-server", "`apt-get install -y redis-server`")


def install_packages(root: Path | None = None) -> Path:
    """The directory holding `node_modules` with the pinned packages; runs `npm ci` there first if needed.
    Safe to call from several processes at once (a file lock; the install is renamed into place)."""
    lock_text = (NODE_DIR / "package-lock.json").read_bytes()
    digest = hashlib.sha256((NODE_DIR / "package.json").read_bytes() + lock_text).hexdigest()[:16]
    root = cache_root() if root is None else root
    target = root / digest
    if (target / ".installed").is_file():
        return target
    npm = _tool("npm", "`apt-get install -y npm`")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the aedes package cache {root}: {exc.strerror} (set FEDFLEET_AEDES_DIR)") from None
    with open(root / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".installed").is_file():  # another process installed it while we waited
            return target
        stage = Path(tempfile.mkdtemp(prefix=f"{digest}.", dir=root))
        try:
            for name in ("package.json", "package-lock.json"):
                shutil.copy(NODE_DIR / name, stage / name)
            p = subprocess.run([npm, "ci", "--omit=dev", "--ignore-scripts", "--no-audit", "--no-fund",
                                "--loglevel=error"], cwd=stage, capture_output=True, text=True, timeout=600)
            if p.returncode != 0:
                last = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()[-1]
                raise RuntimeError(f"npm ci of the aedes packages into {root} failed (exit {p.returncode}): {last}")
            for name, version in PINNED.items():
                got = _version(stage / "node_modules" / name / "package.json")
                if got != version:
                    raise RuntimeError(f"npm installed {name} {got}, not the pinned {version}")
            (stage / ".installed").write_text(" ".join(f"{n}@{v}" for n, v in PINNED.items()) + "\n")
            shutil.rmtree(target, ignore_errors=True)
            stage.rename(target)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return target


def _version(package_json: Path) -> str | None:
    import json

    try:
        return json.loads(package_json.read_text()).get("version")
    except (OSError, ValueError):
        return None


PREFIX = "fedfleet-aedes-"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def sweep_stale_dirs() -> list[Path]:
    """Remove the directories of this user's clusters whose launcher and processes are all gone (a launcher
    killed before `stop()`); returns them."""
    removed = []
    for d in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            if d.is_symlink() or not d.is_dir() or d.stat().st_uid != os.geteuid():
                continue
            pids = [int(x) for f in ("launcher.pid", "pids") if (d / f).is_file()
                    for x in (d / f).read_text().split()]
        except (OSError, ValueError):
            continue
        if pids and not any(_running(pid) for pid in pids):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _die_with_launcher() -> None:
    """In the child before exec: SIGTERM when the launching thread (the main thread) ends."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def mqtt_accepts(port: int, timeout_s: float = 2.0) -> bool:
    """Whether 127.0.0.1:`port` answers an MQTT 3.1.1 CONNECT (clean session) with an accepted CONNACK."""
    cid = f"ff-probe-{secrets.token_hex(4)}".encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x0a" + len(cid).to_bytes(2, "big") + cid
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(bytes([0x10, len(body)]) + body)
            got = b""
            while len(got) < 4:
                chunk = s.recv(4 - len(got))
                if not chunk:
                    return False
                got += chunk
            if got != b"\x20\x02\x00\x00":
                return False
            s.sendall(b"\xe0\x00")  # DISCONNECT: no will, and the session is dropped
            return True
    except OSError:
        return False


class AedesNode:
    def __init__(self, index: int, mqtt_port: int) -> None:
        self.index, self.port = index, mqtt_port
        self.id = f"ff-aedes-{index}-{secrets.token_hex(3)}"
        self.url = f"mqtt://127.0.0.1:{mqtt_port}"
        self.proc: subprocess.Popen[bytes] | None = None


class AedesCluster(Broker):
    kind = "aedes"

    def __init__(self, nodes: int = 2, *, timeout_s: float = 60.0, package_dir: Path | None = None) -> None:
        if not isinstance(nodes, int) or nodes < 1:
            raise ConfigError(f"an aedes cluster needs at least one node, got {nodes!r}")
        node = node_executable()
        redis = redis_executable()
        modules = install_packages(package_dir)
        sweep_stale_dirs()
        self._base = Path(tempfile.mkdtemp(prefix=PREFIX))
        (self._base / "launcher.pid").write_text(f"{os.getpid()}\n")
        self._pdeathsig = threading.current_thread() is threading.main_thread()
        self.redis_port = free_port()
        self.redis: subprocess.Popen[bytes] | None = None
        self.nodes = [AedesNode(i, free_port()) for i in range(nodes)]
        self._logs: list = []
        try:
            self.redis = self._spawn([redis, "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                      "--protected-mode", "yes", "--save", "", "--appendonly", "no",
                                      "--daemonize", "no", "--dir", str(self._base), "--databases", "1",
                                      "--logfile", "", "--loglevel", "warning"], "redis.out")
            wait_for_port(self.redis_port, timeout_s, self.redis)
            for n in self.nodes:
                n.proc = self._spawn([node, str(NODE_DIR / "node.js"), str(modules), str(n.port),
                                      str(self.redis_port), n.id], f"node{n.index}.out", stdin=True)
            (self._base / "pids").write_text("".join(f"{pid}\n" for pid in self.pids))
            deadline = time.monotonic() + timeout_s
            for n in self.nodes:
                self._await(n, deadline)
        except Exception as exc:
            logs = "\n".join(f"--- {f.name}:\n{f.read_text(errors='replace')[-1500:]}"
                             for f in sorted(self._base.glob("*.out")))
            self.stop()
            raise RuntimeError(f"the aedes cluster did not start: {exc}\n{logs}") from None
        self.urls = [n.url for n in self.nodes]
        super().__init__(self.urls[0])

    def _spawn(self, argv: list[str], log_name: str, *, stdin: bool = False) -> subprocess.Popen[bytes]:
        log = open(self._base / log_name, "wb")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        return subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=self._base, start_new_session=True,
                                preexec_fn=_die_with_launcher if self._pdeathsig else None)  # noqa: PLW1509

    def _await(self, n: AedesNode, deadline: float) -> None:
        while True:
            if n.proc is not None and n.proc.poll() is not None:
                raise RuntimeError(f"aedes node {n.index} exited with code {n.proc.returncode}")
            if self.redis is not None and self.redis.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.redis.returncode}")
            if mqtt_accepts(n.port, 1.0):
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"aedes node {n.index} on 127.0.0.1:{n.port} accepted no MQTT connection")
            time.sleep(0.1)

    @property
    def dir(self) -> Path:
        """The cluster's own directory: the logs of Redis (redis.out) and of each node (node<i>.out)."""
        return self._base

    @property
    def node_pids(self) -> list[int]:
        return [n.proc.pid for n in self.nodes if n.proc is not None]

    @property
    def redis_pid(self) -> int | None:
        return None if self.redis is None else self.redis.pid

    @property
    def pids(self) -> list[int]:
        """Every process of the cluster: the nodes, then Redis."""
        return self.node_pids + ([self.redis.pid] if self.redis is not None else [])

    def stop_node(self, index: int) -> None:
        """Stop one node (SIGKILL: its clients lose their connections without a DISCONNECT)."""
        proc = self.nodes[index].proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        procs = [n.proc for n in self.nodes if n.proc is not None]
        for group in (procs, [self.redis] if self.redis is not None else []):
            for p in group:
                if p.poll() is None:
                    p.terminate()
            for p in group:
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
                if p.stdin is not None:
                    try:
                        p.stdin.close()
                    except OSError:
                        pass
        for log in self._logs:
            log.close()
        shutil.rmtree(self._base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run a cluster in the foreground: print one JSON line ({"urls": [...], "pids": [...], "dir": ...}), stop on
    SIGTERM, SIGINT or SIGHUP."""
    import json
    import sys

    from fedfleet.edge_agent.cli_run import ArgParser

    p = ArgParser(prog="python -m fedfleet.tools.infra.aedes", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=2, help="aedes nodes (default %(default)s)")
    args = p.parse_args(argv)
    stopping = threading.Event()
    old = {s: signal.signal(s, lambda signum, frame: stopping.set())
           for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        cluster = AedesCluster(args.nodes)
    except (ConfigError, RuntimeError) as exc:
        print(f"fedfleet aedes: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    try:
        print(json.dumps({"urls": cluster.urls, "pids": cluster.pids, "dir": str(cluster.dir)}), flush=True)
        while not stopping.wait(0.5):
            dead = [p.pid for p in (*(n.proc for n in cluster.nodes), cluster.redis) if p and p.poll() is not None]
            if dead:
                print(f"fedfleet aedes: process {dead[0]} of the cluster exited; stopping", file=sys.stderr)
                return 1
    finally:
        cluster.stop()
        for s, h in old.items():
            signal.signal(s, h)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
