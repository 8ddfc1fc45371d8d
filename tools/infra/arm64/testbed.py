"""The aarch64 test bed: real aarch64 `fedfleet-agent` processes under qemu-user join a real `fedfleet serve`.

    python -m fedfleet.tools.infra.arm64.testbed [--cache DIR] [--rounds 3] [--seed 0] [--json PATH]

Steps, each logged with a timestamp; any failed step exits 1 with the reason:
1. `rootfs.sh` builds (or reuses) a Debian bookworm arm64 root filesystem in CACHE/rootfs (debootstrap and
   qemu-user-static; binfmt_misc, else proot). No emulation available: it says so and fails.
2. A wheel is built from this checkout; inside the guest one venv per extra (`edge`, `edge,tflite`) installs
   it with `--only-binary=:all:` (plus `cryptography`, which the signed downlink needs), so every
   dependency is proven to have an aarch64 wheel. Install time and size are measured; torch must be absent.
3. For each runtime (onnxruntime, litert): an all-x86 run (host agents) and a run with two emulated aarch64
   agents, each a `fedfleet serve` on the host over a Mosquitto on loopback, same seed. The per-round
   accuracies must be equal. The agents' peak RSS (VmHWM of the qemu process) is read before they stop.
4. The int8 backbone's features on the same inputs must agree bit for bit between x86 and aarch64, per runtime.

The guest sees a Cortex-A72 (a Pi 4): its /proc/cpuinfo and the CPU qemu emulates (see enter.sh for why
qemu's default "max" CPU is not used). The venvs and shares are rebuilt on every run; only the rootfs is reused (rebuilt when absent or
incomplete). Emulated timings are 40-80x slower than native and say nothing about a real Pi's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]  # the checkout (tools/infra/arm64/)
FLEET = "armbed"
IDS = ("a64-01", "a64-02")
EXTRAS = {"edge": "/opt/ff-edge", "edge,tflite": "/opt/ff-tflite"}
VENV_OF_RUNTIME = {"onnxruntime": "/opt/ff-edge", "litert": "/opt/ff-tflite"}
IMPORTS = {"edge": "fedfleet.edge_agent.agent, onnxruntime, numpy, paho.mqtt, zstandard, cryptography",
           "edge,tflite": "fedfleet.edge_agent.agent, onnxruntime, ai_edge_litert, flatbuffers, cryptography"}


class BedError(Exception):
    """A step of the test bed failed; the message says which and why."""


def log(msg: str) -> None:
    print(f"[arm64 bed {time.strftime('%H:%M:%S', time.gmtime())}] {msg}", flush=True)


class Guest:
    """Runs commands inside the rootfs through enter.sh; SHARE on the host is /share in the guest."""

    def __init__(self, rootfs: Path, share: Path) -> None:
        self.rootfs, self.share = rootfs, share

    def argv(self, *cmd: str) -> list[str]:
        return ["bash", str(HERE / "enter.sh"), str(self.rootfs), *cmd]

    def env(self) -> dict[str, str]:
        return {**os.environ, "FEDFLEET_ARM64_SHARE": str(self.share)}

    def run(self, script: str, *, timeout: float, what: str) -> str:
        p = subprocess.run(self.argv("/bin/sh", "-c", script), env=self.env(), capture_output=True, text=True,
                           timeout=timeout)
        if p.returncode != 0:
            raise BedError(f"{what} failed in the arm64 guest (exit {p.returncode}):\n{p.stdout[-3000:]}\n"
                           f"{p.stderr[-3000:]}")
        return p.stdout

    def popen(self, cmd: list[str], logfile: Path) -> subprocess.Popen[bytes]:
        out = open(logfile, "wb")  # noqa: SIM115 - closed by the caller via the process's end
        return subprocess.Popen(self.argv(*cmd), env=self.env(), stdout=out, stderr=subprocess.STDOUT)


def build_rootfs(rootfs: Path, logdir: Path) -> tuple[str, float]:
    t0 = time.monotonic()
    logfile = logdir / "rootfs.log"
    with open(logfile, "w") as out:
        p = subprocess.run(["bash", str(HERE / "rootfs.sh"), str(rootfs)], stdout=out, stderr=subprocess.STDOUT,
                           timeout=3600)
    text = logfile.read_text(errors="replace")
    for line in text.splitlines():
        if line.startswith("[arm64 rootfs"):
            log("  " + line)
    if p.returncode != 0:
        raise BedError(f"building the arm64 rootfs failed (exit {p.returncode}); last lines:\n{text[-3000:]}")
    return (rootfs / ".mode").read_text().strip(), time.monotonic() - t0


def build_wheel(share: Path) -> Path:
    wheels = share / "wheel"
    shutil.rmtree(wheels, ignore_errors=True)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(wheels), str(REPO)], capture_output=True, text=True, timeout=600)
    found = sorted(wheels.glob("fedfleet-*.whl"))
    if p.returncode != 0 or not found:
        raise BedError(f"building the fedfleet wheel failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    shutil.rmtree(REPO / "build", ignore_errors=True)
    return found[0]


def install_extras(guest: Guest, wheel: Path, keep: bool = False) -> dict[str, Any]:
    """One venv per extra, from the wheel, binary wheels only; time, size, versions, and no torch.
    `keep` (development only): reuse venvs from an earlier run, reinstalling just the fedfleet wheel."""
    out: dict[str, Any] = {}
    for extra, venv in EXTRAS.items():
        t0 = time.monotonic()
        reused = keep and (guest.rootfs / venv.lstrip("/") / "bin" / "pip").exists()
        if reused:
            guest.run(f"{venv}/bin/pip install -q --no-deps --force-reinstall /share/wheel/{wheel.name}",
                      timeout=1800, what=f"reinstalling fedfleet in [{extra}]")
        else:
            shutil.rmtree(guest.rootfs / venv.lstrip("/"), ignore_errors=True)
            guest.run(f"python3 -m venv {venv} && {venv}/bin/pip install -q --no-cache-dir --only-binary=:all: "
                      f"'/share/wheel/{wheel.name}[{extra}]' cryptography", timeout=3600,
                      what=f"installing [{extra}]")
        install_s = time.monotonic() - t0
        size = subprocess.run(["du", "-sk", str(guest.rootfs / venv.lstrip("/"))], capture_output=True,
                              text=True, check=True).stdout.split()[0]
        check = (f"import importlib.util, platform, {IMPORTS[extra]}; "
                 "assert importlib.util.find_spec('torch') is None, 'torch is installed'; "
                 "print(platform.machine())")
        machine = guest.run(f"{venv}/bin/python -c \"{check}\"", timeout=900, what=f"importing [{extra}]").split()
        if not machine or machine[-1] != "aarch64":
            raise BedError(f"the [{extra}] venv's python reports machine {machine!r}, not aarch64")
        freeze = guest.run(f"{venv}/bin/pip freeze", timeout=600, what="pip freeze").splitlines()
        out[extra] = {"install_s": None if reused else round(install_s, 1), "size_mb": round(int(size) / 1024, 1),
                      "torch": False, "machine": machine[-1], "packages": freeze}
        log(f"  [{extra}] installed in {install_s:.0f} s, {int(size) / 1024:.0f} MB, torch absent, "
            f"{len(freeze)} packages")
    return out


def vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def signing_keys(work: Path) -> tuple[list[str], list[str]]:
    """Coordinator and agent options for the signed downlink when this checkout has it, else none."""
    try:
        import fedfleet.edge_agent.wire.signing  # noqa: F401
    except ImportError:
        return [], []
    key, pub = work / "coordinator.key", work / "coordinator.pub"
    if not key.exists():
        for args, out in ((["--new"], None), (["--public"], pub)):
            p = subprocess.run([sys.executable, "-m", "fedfleet.coordinator.cli", "keys", "--signing-key-file", str(key),
                                *args], capture_output=True, text=True, timeout=120)
            if p.returncode != 0:
                raise BedError(f"fedfleet keys --signing-key-file failed: {p.stderr[-1000:]}")
            if out is not None:
                out.write_text(p.stdout.strip() + "\n")
    return ["--signing-key-file", str(key)], ["--coordinator-key-file", "coordinator.pub"]


def run_job(arch: str, runtime: str, args: argparse.Namespace, guest: Guest, share: Path,
            logdir: Path) -> dict[str, Any]:
    """One `fedfleet serve` with two agents (host or emulated) over Mosquitto; per-round accuracy and RSS."""
    from fedfleet.coordinator.broker import MosquittoBroker

    tag = f"{arch}-{runtime}"
    run_dir = logdir / f"run-{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)
    serve_opts, agent_opts = signing_keys(share)
    agents: list[subprocess.Popen[bytes]] = []
    peaks: dict[str, float | None] = {}
    t0 = time.monotonic()
    with MosquittoBroker() as broker:
        for agent in IDS:
            common = ["--broker", broker.url, "--fleet", FLEET, "--id", agent, "--runtime", runtime,
                      "--profile", "rpi4b", "--meter", "model"]
            if arch == "x86_64":
                cmd = [sys.executable, "-m", "fedfleet.edge_agent.cli", *common, "--key-file", str(share / f"{agent}.key"),
                       "--data", str(share / f"{agent}.npz"),
                       *[str(share / o) if o.endswith(".pub") else o for o in agent_opts]]
                out = open(logdir / f"agent-{tag}-{agent}.log", "wb")  # noqa: SIM115
                agents.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO))
            else:
                cmd = [f"{VENV_OF_RUNTIME[runtime]}/bin/fedfleet-agent", *common,
                       "--key-file", f"/share/{agent}.key", "--data", f"/share/{agent}.npz",
                       *["/share/" + o if o.endswith(".pub") else o for o in agent_opts]]
                agents.append(guest.popen(cmd, logdir / f"agent-{tag}-{agent}.log"))
        serve = [sys.executable, "-m", "fedfleet.coordinator.cli", "serve", "--broker", broker.url,
                 "--secret-file", str(share / "fleet.secret"), "--fleet", FLEET, "--roster", ",".join(IDS),
                 "--rounds", str(args.rounds), "--seed", str(args.seed), "--runtime", runtime, "--quorum", "1.0",
                 "--deadline", str(args.deadline), "--wait", str(args.deadline), "--run-dir", str(run_dir),
                 "--json", str(run_dir / "serve.json"), *serve_opts]
        try:
            with open(logdir / f"serve-{tag}.log", "w") as out:
                p = subprocess.run(serve, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                   timeout=args.deadline * (args.rounds + 2))
            for agent, proc in zip(IDS, agents):
                peaks[agent] = vm_hwm_mb(proc.pid)
        finally:
            for proc in agents:
                proc.terminate()
            for proc in agents:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
    wall = time.monotonic() - t0
    if p.returncode != 0:
        tails = "\n".join(f"--- {f.name}:\n{f.read_text(errors='replace')[-1500:]}"
                          for f in sorted(logdir.glob(f"*-{tag}*.log")))
        raise BedError(f"the {tag} run failed (serve exit {p.returncode}):\n{tails}")
    from fedfleet.coordinator.records.ledger import LedgerView

    with LedgerView(run_dir / "ledger.sqlite") as view:
        rounds = view.rounds(view.runs()[-1])
    acc, ok = [r["accuracy"] for r in rounds], [r["ok"] for r in rounds]
    if len(acc) != args.rounds or any(n != len(IDS) for n in ok):
        raise BedError(f"the {tag} run booked rounds {acc} with ok counts {ok}; expected {args.rounds} rounds of "
                       f"{len(IDS)} results")
    log(f"  {tag}: accuracy per round {acc}, wall {wall:.0f} s, agent peak RSS {peaks} MB")
    return {"accuracy": acc, "wall_s": round(wall, 1), "agent_peak_rss_mb": peaks}


def prepare_share(share: Path, args: argparse.Namespace) -> None:
    """Fleet secret, agent keys, their shards, the model package and the feature-check inputs."""
    from fedfleet.coordinator.job.config import JobConfig
    from fedfleet.coordinator.job.run import build, shards
    from fedfleet.edge_agent.wire.protocol import derive_key

    secret = os.urandom(32).hex().encode()
    (share / "fleet.secret").write_bytes(secret)
    cfg = JobConfig(agents=len(IDS), seed=args.seed)
    local, test = shards(cfg)
    for agent, d in zip(IDS, local):
        (share / f"{agent}.key").write_text(derive_key(secret, agent).hex() + "\n")
        np.savez(share / f"{agent}.npz", x=d.x, y=d.y)
    blob, _ = build(cfg)
    (share / "package.zip").write_bytes(blob)
    np.savez(share / "inputs.npz", x=np.concatenate([test.x, local[0].x]))
    shutil.copy(HERE / "features.py", share / "features.py")


def compare_features(guest: Guest, share: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for runtime, venv in VENV_OF_RUNTIME.items():
        host_file, guest_file = share / f"feat-x86-{runtime}.npz", share / f"feat-arm-{runtime}.npz"
        subprocess.run([sys.executable, str(HERE / "features.py"), str(share / "package.zip"),
                        str(share / "inputs.npz"), runtime, str(host_file)], check=True, cwd=REPO,
                       capture_output=True, timeout=600)
        guest.run(f"cd /tmp && {venv}/bin/python /share/features.py /share/package.zip /share/inputs.npz {runtime} "
                  f"/share/{guest_file.name}", timeout=1800, what=f"features on {runtime}")
        with np.load(host_file) as h, np.load(guest_file) as g:
            a, b = h["features"], g["features"]
            machines = (str(h["machine"]), str(g["machine"]))
        same = a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
        diff = float(np.max(np.abs(a.astype(np.float64) - b))) if a.shape == b.shape else None
        out[runtime] = {"bit_identical": same, "shape": list(a.shape), "dtype": str(a.dtype),
                        "max_abs_diff": diff, "machines": list(machines)}
        log(f"  features {runtime}: {machines[0]} vs {machines[1]}: bit identical {same} (max |diff| {diff})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedfleet.tools.infra.arm64.testbed", description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=str(REPO / ".cache" / "arm64"), help="rootfs, shares and logs")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline", type=float, default=900.0, help="seconds per round and to wait for agents")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--keep-venvs", action="store_true", help="development: reuse the venvs of an earlier run")
    args = p.parse_args(argv)
    cache = Path(args.cache).resolve()
    share, logdir = cache / "share", cache / "logs"
    for d in (share, logdir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    t_all = time.monotonic()
    result: dict[str, Any] = {"passed": False}
    try:
        log(f"1/4 rootfs in {cache / 'rootfs'} (log {logdir / 'rootfs.log'})")
        mode, rootfs_s = build_rootfs(cache / "rootfs", logdir)
        result.update(emulation=mode, rootfs_s=round(rootfs_s, 1))
        guest = Guest(cache / "rootfs", share)
        log("2/4 wheel from the checkout; one venv per extra, --only-binary=:all:")
        wheel = build_wheel(share)
        result["wheel"] = wheel.name
        result["extras"] = install_extras(guest, wheel, keep=args.keep_venvs)
        log("3/4 runs: x86 agents, then emulated aarch64 agents, per runtime, same seed")
        prepare_share(share, args)
        runs: dict[str, Any] = {}
        for runtime in VENV_OF_RUNTIME:
            x86 = run_job("x86_64", runtime, args, guest, share, logdir)
            arm = run_job("aarch64", runtime, args, guest, share, logdir)
            runs[runtime] = {"x86_64": x86, "aarch64": arm, "same_accuracy": x86["accuracy"] == arm["accuracy"]}
        result["runs"] = runs
        log("4/4 int8 backbone features, x86 against aarch64")
        result["features"] = compare_features(guest, share)
        failures = [f"{rt}: accuracy x86 {r['x86_64']['accuracy']} != aarch64 {r['aarch64']['accuracy']}"
                    for rt, r in runs.items() if not r["same_accuracy"]]
        failures += [f"{rt}: features differ (max |diff| {f['max_abs_diff']})"
                     for rt, f in result["features"].items() if not f["bit_identical"]]
        if failures:
            raise BedError("; ".join(failures))
        result["passed"] = True
    except (BedError, subprocess.TimeoutExpired, subprocess.CalledProcessError) as exc:
        result["error"] = str(exc)[-4000:]
        log(f"FAILED: {exc}")
    result["total_s"] = round(time.monotonic() - t_all, 1)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text, flush=True)
    log(f"{'PASSED' if result['passed'] else 'FAILED'} in {result['total_s']:.0f} s. Emulated timings say "
        "nothing about a real Pi's speed.")
    checks = [True] * len(result.get("extras", {}))
    checks += [r["same_accuracy"] for r in result.get("runs", {}).values()]
    checks += [f["bit_identical"] for f in result.get("features", {}).values()]
    expected = len(EXTRAS) + 2 * len(VENV_OF_RUNTIME)
    passed = sum(checks) if result["passed"] else min(sum(checks), expected - 1)
    print(f"arm64-bed: {passed} passed, {expected - passed} failed", flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
