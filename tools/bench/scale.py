"""`fedfleet bench scale`: what the default demo configuration costs per agent, against the compute floor.

Runs `fedfleet demo` (the default configuration: int8 backbone, MLP head, FedAvg, FedZip uplink and the
default downlink) as a real process at each fleet size, on Mosquitto and on the embedded broker, and beside
it, in the same run, a plain numpy loop of the same training (the same shards, learner and rounds, no
network): the compute floor. From the demo's ledger and summary:

- `round_s[broker][agents]`: the median round wall time (round 1, which carries the full state, excluded);
- `floor_round_s[agents]`: the median round of the numpy loop;
- `per_agent_ms[broker]`: the least-squares slope of (round_s - floor) over agents, in ms per agent;
- `startup_s[broker]`: process start to round 1 dispatched, `tail_s[broker]`: last round done to process
  exit (at the smallest fleet);
- `pss_mib[agents]`: the peak summed PSS of every process the demo starts (Mosquitto runs), sampled every
  0.1 s; the details add the peak summed USS (`uss_mib`, steadier on a shared machine: see `PssSampler`),
  the slopes of both over agents, and the summed per-process peak RSS (`rss_hwm_mib`);
- bytes per agent-round up and down, and the final accuracy, of the smallest Mosquitto run.

Fleets larger than the data set can partition (digits: 143 agents at the default alpha) run on sampled shards
(`shard_mode = "sampled"`: each agent draws its own shard, with replacement across agents): `--shards auto`, the
default, partitions while the largest fleet size can be partitioned and samples every size otherwise, so that all
sizes of one run share a rule; the result says which (`shards`).

On this machine PYTHONDONTWRITEBYTECODE is set, so every demo process compiles fedfleet's own modules
again; `--bytecode-cache DIR` compiles them once into DIR and runs the demos from there, as an installed copy
runs (the details say which: `bytecode_cached`).

Writes {"agents", "floor_round_s", "round_s", "per_agent_ms", "startup_s", "tail_s", "pss_mib",
"bytes_up_per_agent_round", "bytes_down_per_agent_round", "final_accuracy", "shards"}; `--plot` draws round time
against agents.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.tools.bench.output import emit

KEYS = ("agents", "floor_round_s", "round_s", "per_agent_ms", "startup_s", "tail_s", "pss_mib",
        "bytes_up_per_agent_round", "bytes_down_per_agent_round", "final_accuracy", "shards")


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _memory_kib(pid: int) -> tuple[int, int, int]:
    """(PSS, USS, peak RSS) of one process in KiB, from /proc (zeros once it has gone)."""
    pss = uss = hwm = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith(("Private_Clean:", "Private_Dirty:")):
                uss += int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    except OSError:
        pass
    return pss, uss, hwm


class PssSampler:
    """Peak of the summed PSS (and USS) of a process tree, sampled every `every_s`, and the sum of each
    process's own peak RSS (VmHWM, kept by the kernel, so no peak is missed between samples).

    PSS splits a shared page among the processes mapping it, so the PSS of a process whose libraries
    (libtorch) are also mapped by other processes on the machine drops while they run: on a shared machine
    USS (the pages only this tree holds) is the steadier number for what an agent adds."""

    def __init__(self, pid: int, every_s: float = 0.1) -> None:
        self.pid, self.every_s = pid, every_s
        self.peak_kib = self.peak_uss_kib = 0
        self.hwm_kib: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            pss = uss = 0
            for p in _tree(self.pid):
                p_pss, p_uss, p_hwm = _memory_kib(p)
                pss, uss = pss + p_pss, uss + p_uss
                self.hwm_kib[p] = max(self.hwm_kib.get(p, 0), p_hwm)
            self.peak_kib, self.peak_uss_kib = max(self.peak_kib, pss), max(self.peak_uss_kib, uss)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kib / 1024

    @property
    def uss_mib(self) -> float:
        return self.peak_uss_kib / 1024

    @property
    def rss_hwm_mib(self) -> float:
        return sum(self.hwm_kib.values()) / 1024


def bytecode_env(cache_dir: str) -> dict[str, str]:
    """The environment for demo processes that read compiled bytecode from `cache_dir` (written there by
    `compileall` first), as an installed fedfleet would, also where PYTHONDONTWRITEBYTECODE is set."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = cache_dir
    root = Path(__file__).resolve().parents[2]  # the checkout (tools/bench/scale.py)
    subprocess.run([sys.executable, "-m", "compileall", "-q", *(str(root / d) for d in
                    ("coordinator", "edge_agent", "models", "tools", "firmware_profiles"))],
                   env=env, check=True, capture_output=True)
    return env


def demo_run(agents: int, rounds: int, broker: str, seed: int = 0,
             env: dict[str, str] | None = None, shard_mode: str = "partition") -> dict[str, Any]:
    """One `fedfleet demo` process; its round times, timeline, peak PSS, bytes and accuracy."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "fedfleet.coordinator.cli", "demo", "--agents", str(agents), "--rounds", str(rounds),
               "--broker", broker, "--seed", str(seed), "--quiet", "--report", "none", "--run-dir", str(run_dir),
               "--shard-mode", shard_mode]
        start = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        sampler = PssSampler(proc.pid)
        out, err = proc.communicate(timeout=1800)
        exited = time.time()
        pss = sampler.stop()
        if proc.returncode != 0:
            raise RuntimeError(f"demo with {agents} agents on {broker} failed: {err.strip()[-2000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
        from fedfleet.coordinator.records.ledger import LedgerView

        with LedgerView(run_dir / "ledger.sqlite") as view:
            run = view.runs()[-1]
            walls = [r["wall_s"] for r in view.rounds(run)]
            rows = view.agent_rows(run)
        up = sum(int(r["bytes_up"] or 0) for r in rows) / max(1, len(rows))
        down = sum(int(r["bytes_down"] or 0) for r in rows) / max(1, len(rows))
    timeline = summary["timeline"]
    return {"agents": agents, "broker": broker, "round_s": statistics.median(walls[1:] or walls),
            "startup_s": timeline["first_dispatch_at"] - start, "tail_s": exited - timeline["last_round_at"],
            "pss_mib": pss, "uss_mib": sampler.uss_mib, "rss_hwm_mib": sampler.rss_hwm_mib, "bytes_up": up, "bytes_down": down, "final_accuracy": summary["final_accuracy"]}


def floor_run(agents: int, rounds: int, seed: int = 0, shard_mode: str = "partition") -> float:
    """Median round time of the same training as a plain numpy loop: the agents' learner on their shards
    (features cached as the agents cache them), then the sample-weighted mean of the deltas."""
    from fedfleet.coordinator.job.config import JobConfig
    from fedfleet.coordinator.job.run import build, shards, small_model_threads
    from fedfleet.coordinator.strategies import method_config
    from fedfleet.edge_agent.learners import Task, create
    from fedfleet.edge_agent.model import EdgeModel

    small_model_threads()
    cfg = JobConfig(agents=agents, rounds=rounds, seed=seed, shard_mode=shard_mode)
    local, _ = shards(cfg)
    blob, _ = build(cfg)
    model = EdgeModel.from_bytes(blob)
    conf = {k: v for k, v in method_config(cfg).items() if k in ("lr", "epochs", "batch")}
    learners = [create("fedavg") for _ in local]
    models = [model.__class__(**{**model.__dict__, "_cache": {}}) for _ in local]
    for m, d in zip(models, local):
        m.features(d.x, cache_key="local")  # the agents' feature cache, filled before round 1 as on the agents
    state = {k: v.copy() for k, v in model.head_init.items()}
    times = []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        deltas, weights = [], []
        for i, (learner, m, d) in enumerate(zip(learners, models, local)):
            task = Task(run="floor", round=r, method="fedavg", config={**conf, "seed": seed * 1000 + i},
                        tensors=state)
            res = learner.learn(task, d, m)
            deltas.append(res.tensors)
            weights.append(res.samples)
        w = np.asarray(weights, np.float64) / sum(weights)
        state = {k: (state[k] + sum(wi * dl[k] for wi, dl in zip(w, deltas))).astype(np.float32) for k in state}
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def shard_mode_for(agent_counts: list[int], shards: str = "auto") -> str:
    """`shards` ("partition" or "sampled"), or for "auto" the partition when the largest fleet can be partitioned."""
    if shards != "auto":
        return shards
    from fedfleet.coordinator.job.config import JobConfig
    from fedfleet.coordinator.tasks.classification import ClassificationTask
    from fedfleet.edge_agent.errors import ConfigError

    try:
        ClassificationTask(JobConfig(agents=max(agent_counts))).shards(max(agent_counts))
    except ConfigError:
        return "sampled"
    return "partition"


def slope_ms(xs: list[int], ys: list[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    return float(np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)[0] * 1000)


def run(agent_counts: list[int], rounds: int, brokers: list[str], progress: bool = True,
        env: dict[str, str] | None = None, shards: str = "auto") -> dict[str, Any]:
    mode = shard_mode_for(agent_counts, shards)
    floor = {}
    runs: dict[str, dict[int, dict[str, Any]]] = {b: {} for b in brokers}
    for n in agent_counts:  # interleaved: the floor and each broker at one size, then the next size
        floor[n] = floor_run(n, rounds, shard_mode=mode)
        for b in brokers:
            runs[b][n] = demo_run(n, rounds, b, env=env, shard_mode=mode)
            if progress:
                print(f"scale: {n} agents on {b}: round {runs[b][n]['round_s']:.3f} s (floor {floor[n]:.4f} s)",
                      file=sys.stderr, flush=True)
    small = min(agent_counts)
    ref = runs["mosquitto"][small] if "mosquitto" in runs else runs[brokers[0]][small]
    round_s = {b: {n: runs[b][n]["round_s"] for n in agent_counts} for b in brokers}
    return {
        "agents": agent_counts,
        "floor_round_s": floor,
        "round_s": round_s,
        "per_agent_ms": {b: slope_ms(agent_counts, [round_s[b][n] - floor[n] for n in agent_counts]) for b in brokers},
        "startup_s": {b: runs[b][small]["startup_s"] for b in brokers},
        "tail_s": {b: runs[b][small]["tail_s"] for b in brokers},
        "pss_mib": {n: runs[brokers[0]][n]["pss_mib"] for n in agent_counts},
        "bytes_up_per_agent_round": ref["bytes_up"],
        "bytes_down_per_agent_round": ref["bytes_down"],
        "final_accuracy": ref["final_accuracy"],
        "shards": mode if mode == "partition" else "sampled (each agent draws its own shard: with replacement across "
                                                   "agents)",
        "pss_mib_per_broker": {b: {n: runs[b][n]["pss_mib"] for n in agent_counts} for b in brokers},
        "pss_slope_mib_per_agent": slope_ms(agent_counts, [runs[brokers[0]][n]["pss_mib"] for n in agent_counts]) / 1000,
        "uss_mib": {n: runs[brokers[0]][n]["uss_mib"] for n in agent_counts},
        "uss_slope_mib_per_agent": slope_ms(agent_counts, [runs[brokers[0]][n]["uss_mib"] for n in agent_counts]) / 1000,
        "rss_hwm_mib": {n: runs[brokers[0]][n]["rss_hwm_mib"] for n in agent_counts},
        # False: every demo process compiles fedfleet's modules (PYTHONDONTWRITEBYTECODE, no --bytecode-cache)
        "bytecode_cached": env is not None or not sys.flags.dont_write_bytecode,
        "rounds": rounds,
    }


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = result["agents"]
    for b, series in result["round_s"].items():
        ax.plot(xs, [series[n] for n in xs], marker="o", label=f"default demo, {b}")
    ax.plot(xs, [result["floor_round_s"][n] for n in xs], marker="s", linestyle="--", label="numpy compute floor")
    ax.set_xlabel("agents")
    ax.set_ylabel("round wall time (s, median)")
    ax.set_title("Round time against fleet size")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="fedfleet bench scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", default="10,50,100", help="comma-separated fleet sizes")
    p.add_argument("--rounds", type=int, default=20, help="rounds per demo run (default %(default)s)")
    p.add_argument("--brokers", default="mosquitto,embedded", help="comma-separated brokers to compare (default %(default)s)")
    p.add_argument("--shards", choices=("auto", "partition", "sampled"), default="auto",
                   help="the agents' shards: disjoint (partition), each agent's own draw (sampled), or auto (default): "
                        "partition unless the largest fleet is too large for it")
    p.add_argument("--json", help="also write the result JSON to this file")
    p.add_argument("--plot", help="also draw the result as a PNG to this file")
    p.add_argument("--bytecode-cache", metavar="DIR",
                   help="run the demos with fedfleet's modules compiled once into DIR (PYTHONPYCACHEPREFIX), as an "
                        "installed copy runs, also where PYTHONDONTWRITEBYTECODE is set")
    args = p.parse_args(argv)
    counts = sorted(int(a) for a in args.agents.split(","))
    env = bytecode_env(args.bytecode_cache) if args.bytecode_cache else None
    result = run(counts, args.rounds, [b.strip() for b in args.brokers.split(",") if b.strip()], env=env,
                 shards=args.shards)
    if args.plot:
        plot(result, args.plot)
    emit(result, KEYS, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
