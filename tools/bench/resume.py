"""`fedfleet bench resume`: kill `fedfleet serve` mid-round, resume it, and compare with a run never killed.

Everything is a real process over a real Mosquitto: N `fedfleet-agent` processes, and `fedfleet serve` runs
as a subprocess three times with the same job and seed:
1. uninterrupted, `--rounds R` into run dir A;
2. into run dir B, SIGKILLed a third of a typical round into round K, once round K - 1 is committed (mid-round);
3. the same command with `--resume B`.
The same agents serve all three (runs 1 and 2 have different run ids, so the agents start run 2 clean).

Writes {"rounds", "killed_at", "rounds_lost", "final_accuracy", "uninterrupted_accuracy"}:
`killed_at` is the round that was open when the coordinator died, `rounds_lost` how many rounds had to be
run again (from the first round the resumed coordinator ran through `killed_at`). The details line adds
what the kill left in the ledger, whether any earlier checkpoint or ledger row changed, and both curves.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.tools.bench.output import emit, progress

KEYS = ("rounds", "killed_at", "rounds_lost", "final_accuracy", "uninterrupted_accuracy")


def _query(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute(sql, params).fetchall()
    except sqlite3.OperationalError:  # the schema is not written yet
        return []
    finally:
        con.close()


def _serve_cmd(url: str, secret: Path, fleet: str, roster: list[str], rounds: int, seed: int, method: str,
               run_dir: Path, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "fedfleet.coordinator.cli", "serve", "--broker", url, "--secret-file", str(secret),
            "--signing-key-file", str(secret.parent / "coordinator.key"),
            "--fleet", fleet, "--roster", ",".join(roster), "--rounds", str(rounds), "--seed", str(seed),
            "--method", method, "--quorum", "1.0", "--deadline", "60", "--wait", "120", "--run-dir", str(run_dir),
            "--json", str(out), *extra]


def _serve(cmd: list[str], log: Path, timeout_s: float) -> dict[str, Any]:
    with open(log, "wb") as fh:
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s)
    if r.returncode != 0:
        raise RuntimeError(f"fedfleet serve exited {r.returncode}: {log.read_text(errors='replace')[-3000:]}")
    return json.loads(Path(cmd[cmd.index("--json") + 1]).read_text())


def _fingerprint(run_dir: Path, run: str, before_round: int) -> dict[str, Any]:
    """What must not change on resume: earlier checkpoints' bytes and earlier rounds' ledger rows."""
    ckpts = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
             for p in sorted((run_dir / "checkpoints").glob("round-*.pt"))
             if int(p.stem.split("-")[1]) < before_round}
    db = run_dir / "ledger.sqlite"
    rows = _query(db, "SELECT id, round, phase, agent, status, bytes_up, bytes_down, samples FROM agent_rounds"
                  " WHERE run = ? AND round < ? ORDER BY id", (run, before_round))
    evals = _query(db, "SELECT round, accuracy, loss FROM rounds WHERE run = ? AND round < ? ORDER BY round",
                   (run, before_round))
    return {"checkpoints": ckpts, "rows": rows, "rounds": evals}


def run(*, agents: int = 4, rounds: int = 12, kill_round: int = 7, seed: int = 0, method: str = "fedavg",
        workdir: Path | None = None, timeout_s: float = 900.0) -> dict[str, Any]:
    import numpy as np

    from fedfleet.coordinator.broker import MosquittoBroker
    from fedfleet.coordinator.job.config import JobConfig
    from fedfleet.coordinator.job.run import agent_ids, shards
    from fedfleet.edge_agent.wire import protocol, signing

    if not 1 < kill_round <= rounds:
        raise ValueError(f"--kill-round must be in 2..{rounds}, got {kill_round}")
    tmp = tempfile.TemporaryDirectory(prefix="fedfleet-bench-resume-") if workdir is None else None
    work = Path(tmp.name if tmp else workdir)  # type: ignore[arg-type]
    work.mkdir(parents=True, exist_ok=True)
    cfg = JobConfig(agents=agents, seed=seed, method=method)
    roster = agent_ids(cfg)
    local, _ = shards(cfg)
    secret = os.urandom(32).hex().encode()  # `fedfleet serve --secret-file` uses the file's text as the secret
    (work / "fleet.secret").write_bytes(secret)
    seed_key = signing.new_signing_seed()  # the coordinator's key; agents pin its public half
    signing.write_private_key_file(work / "coordinator.key", seed_key)
    (work / "coordinator.pub").write_text(signing.public_key(seed_key).hex() + "\n")
    fleet = f"resume{os.getpid()}"
    broker = MosquittoBroker()
    procs: list[subprocess.Popen] = []
    t0 = time.perf_counter()
    try:
        for agent, data in zip(roster, local):
            np.savez(work / f"{agent}.npz", x=data.x, y=data.y)
            (work / f"{agent}.key").write_text(protocol.derive_key(secret, agent).hex())
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "fedfleet.edge_agent.cli", "--broker", broker.url, "--fleet", fleet, "--id", agent,
                 "--key-file", str(work / f"{agent}.key"), "--coordinator-key-file", str(work / "coordinator.pub"),
                 "--data", str(work / f"{agent}.npz"), "--threads", "1",
                 "--meter", "none"], stdout=open(work / f"{agent}.log", "wb"), stderr=subprocess.STDOUT))  # noqa: SIM115

        def cmd(run_dir: Path, out: str, *extra: str) -> list[str]:
            return _serve_cmd(broker.url, work / "fleet.secret", fleet, roster, rounds, seed, method, run_dir,
                              work / out, list(extra))

        a_dir, b_dir = work / "uninterrupted", work / "interrupted"
        progress("resume", f"the uninterrupted run: {rounds} rounds, {agents} agent processes")
        uninterrupted = _serve(cmd(a_dir, "a.json"), work / "a.log", timeout_s)

        # the interrupted run: SIGKILL inside round `kill_round`: once round kill_round - 1 is committed, after
        # a third of a typical round (the uninterrupted run's median round time). Results are booked in the
        # ledger only when a phase closes, so the first `ok` row of a round comes too late to aim at.
        walls = sorted(w for (w,) in _query(a_dir / "ledger.sqlite", "SELECT wall_s FROM rounds"))
        into_round = 0.3 * walls[len(walls) // 2] if walls else 0.0
        db = b_dir / "ledger.sqlite"
        progress("resume", f"the interrupted run: SIGKILL inside round {kill_round}")
        with open(work / "b.log", "wb") as log:
            victim = subprocess.Popen(cmd(b_dir, "b.json"), stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and victim.poll() is None:
                if _query(db, "SELECT 1 FROM rounds WHERE round = ?", (kill_round - 1,)):
                    time.sleep(into_round)
                    break
                time.sleep(0.005)
            if victim.poll() is not None:
                raise RuntimeError(f"serve ended before round {kill_round}: {(work / 'b.log').read_text()[-3000:]}")
            victim.send_signal(signal.SIGKILL)
            victim.wait(30)
        run_id = json.loads((b_dir / "job.json").read_text())["run"]
        evaluated = [r for (r,) in _query(db, "SELECT round FROM rounds WHERE run = ? ORDER BY round", (run_id,))]
        killed_at = max([0, *evaluated]) + 1  # the round that was open (no evaluation row yet)
        left = _query(db, "SELECT status, COUNT(*) FROM agent_rounds WHERE run = ? AND round = ? GROUP BY status",
                      (run_id, killed_at))
        before = _fingerprint(b_dir, run_id, killed_at)

        progress("resume", f"killed in round {killed_at}; resuming")
        resumed = _serve(cmd(b_dir, "b.json", "--resume", str(b_dir)), work / "c.log", timeout_s)
        after = _fingerprint(b_dir, run_id, killed_at)
        first_rerun = _query(db, "SELECT round FROM resumes WHERE run = ? ORDER BY ts DESC LIMIT 1", (run_id,))
        rerun_from = int(first_rerun[0][0]) if first_rerun else 1
        curve = dict(_query(db, "SELECT round, accuracy FROM rounds WHERE run = ? ORDER BY round", (run_id,)))
        curve_a = dict(_query(a_dir / "ledger.sqlite", "SELECT round, accuracy FROM rounds ORDER BY round"))
        marked = _query(db, "SELECT status, COUNT(*) FROM agent_rounds WHERE run = ? AND status LIKE 'interrupted:%'"
                        " GROUP BY status", (run_id,))
        ok_rows = _query(db, "SELECT round, COUNT(*) FROM agent_rounds WHERE run = ? AND status = 'ok' GROUP BY round",
                         (run_id,))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.stop()
        if tmp is not None:
            tmp.cleanup()
    return {
        "rounds": resumed["rounds"],
        "killed_at": killed_at,
        "rounds_lost": killed_at - rerun_from + 1,
        "final_accuracy": resumed["final_accuracy"],
        "uninterrupted_accuracy": uninterrupted["final_accuracy"],
        "same_run_id": run_id,
        "left_by_the_kill_in_round": {s: n for s, n in left},
        "marked_interrupted": {s: n for s, n in marked},
        "ok_rows_per_round": {r: n for r, n in ok_rows},
        "earlier_rounds_unchanged": before == after,
        "earlier_checkpoints": len(before["checkpoints"]),
        "accuracy_curve": [round(curve[r], 4) for r in sorted(curve)],
        "uninterrupted_curve": [round(curve_a[r], 4) for r in sorted(curve_a)],
        "agents": agents,
        "method": method,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="fedfleet bench resume", description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=4, help="agents (each its own process) (default %(default)s)")
    p.add_argument("--rounds", type=int, default=12, help="rounds of the job (default %(default)s)")
    p.add_argument("--kill-round", type=int, default=7, help="SIGKILL serve once this round has a result")
    p.add_argument("--seed", type=int, default=0, help="seed of the job (default %(default)s)")
    p.add_argument("--method", default="fedavg", help="the job's method (default %(default)s)")
    p.add_argument("--json", help="also write the result JSON to this file")
    args = p.parse_args(argv)
    out = run(agents=args.agents, rounds=args.rounds, kill_round=args.kill_round, seed=args.seed, method=args.method)
    emit(out, KEYS, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
