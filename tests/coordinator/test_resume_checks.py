"""Resume checks everything it reads: each checkpoint field, the checkpoint's digest booked in the ledger, the
ledger itself and `job.json`'s run id. Every refusal is a one-line `ConfigError` naming what is wrong, and
a refused resume leaves the ledger's history and the checkpoints as they were."""

from __future__ import annotations

import hashlib
import io
import sqlite3

import pytest
import torch

from fedfleet.coordinator.records.store import RunStore
from fedfleet.coordinator.strategies import create as create_strategy
from fedfleet.edge_agent.errors import ConfigError

AGENTS = ["a-0", "a-1"]
META = {"strategy": "fedavg", "roster": AGENTS}


def _initial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(3, generator=g)}


def _strategy():
    return create_strategy("fedavg", _initial(), lr=0.1)


def _run(tmp_path, rounds: int = 3, downlink: bool = False) -> None:
    """A run `r` with `rounds` committed rounds (rows, evaluations, checkpoints) and rows of an interrupted one."""
    store = RunStore(tmp_path)
    store.start_run("r", META)
    strategy = _strategy()
    for r in range(1, rounds + 1):
        for a in AGENTS:
            store.ledger.record("r", r, a, "ok", bytes_up=10)
        strategy.state = {k: v + 0.01 for k, v in strategy.state.items()}
        dl = {"version": r, "state": {k: v.numpy() for k, v in strategy.state.items()}} if downlink else None
        store.save_checkpoint("r", r, strategy, rng=torch.manual_seed(0) and _rng_state(), bytes_up=100 * r,
                              bytes_down=50 * r, summary={"accuracy": 0.1 * r, "loss": 1.0}, downlink=dl)
        store.ledger.record_round("r", r, accuracy=0.1 * r, loss=1.0)
    store.ledger.record("r", rounds + 1, AGENTS[0], "ok", bytes_up=10)
    store.close()


def _rng_state() -> dict:
    import numpy as np

    return np.random.default_rng(5).bit_generator.state


def _history(tmp_path) -> tuple[list, list, dict]:
    db = sqlite3.connect(tmp_path / "ledger.sqlite")
    try:
        rows = db.execute("SELECT round, agent, status FROM agent_rounds ORDER BY id").fetchall()
        evals = db.execute("SELECT round, accuracy FROM rounds ORDER BY round").fetchall()
    finally:
        db.close()
    files = {p.name: p.read_bytes() for p in sorted((tmp_path / "checkpoints").glob("*.pt"))}
    return rows, evals, files


def _tamper(tmp_path, round: int, change, *, rebook: bool) -> None:
    """Rewrite round `round`'s checkpoint through `change(ckpt)`; `rebook` also books the new bytes' digest
    (as a checkpoint damaged before it committed would be), so the field checks are what refuses it."""
    path = tmp_path / "checkpoints" / f"round-{round:04d}.pt"
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    path.write_bytes(buf.getvalue())
    if rebook:
        db = sqlite3.connect(tmp_path / "ledger.sqlite")
        with db:
            db.execute("UPDATE checkpoints SET sha256 = ? WHERE run = 'r' AND round = ?",
                       (hashlib.sha256(buf.getvalue()).hexdigest(), round))
        db.close()


def _refused(tmp_path, match: str, run: str = "r") -> str:
    before = _history(tmp_path)
    store = RunStore(tmp_path)
    try:
        with pytest.raises(ConfigError, match=match) as err:
            store.resume_run(run, META, _strategy())
    finally:
        store.close()
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    assert _history(tmp_path) == before, "a refused resume changed the ledger or the checkpoints"
    return str(err.value)


def test_an_intact_run_resumes_from_its_newest_checkpoint(tmp_path):
    _run(tmp_path, downlink=True)
    store = RunStore(tmp_path)
    strategy = _strategy()
    at = store.resume_run("r", META, strategy)
    store.close()
    assert (at.round, at.bytes_up, at.bytes_down, at.interrupted_rows) == (3, 300, 150, 1)
    assert at.downlink["version"] == 3
    assert torch.allclose(strategy.state["w"], _initial()["w"] + 0.03)


def test_scaled_weights_differ_from_the_committed_checkpoint(tmp_path):
    _run(tmp_path)
    _tamper(tmp_path, 3, lambda c: c["strategy_state"].update(w=c["strategy_state"]["w"] * -1000), rebook=False)
    msg = _refused(tmp_path, "round-0003.pt differs from the checkpoint committed for round 3")
    assert "SHA-256" in msg


@pytest.mark.parametrize("change, match", [
    (lambda c: c.update(round=-5), "field 'round' = -5 is not the round in its name"),
    (lambda c: c.update(round=1e9), "field 'round' = 1000000000.0 is not the round in its name"),
    (lambda c: c.update(round=10**9), "field 'round' = 1000000000 is not the round in its name"),
    (lambda c: c["strategy_state"].update(w=torch.full((3, 4), float("nan"))),
     "field 'strategy_state.w' has NaN or infinite entries"),
    (lambda c: c["strategy_state"].update(w=torch.zeros(4, 3)), r"field 'strategy_state.w' is torch.float32 \(4, 3\)"),
    (lambda c: c["strategy_state"].pop("b"), "field 'strategy_state' lacks tensor 'b'"),
    (lambda c: c.update(state={**c["state"], "extra": torch.zeros(2)}), "field 'state' has tensor 'extra' the model does not have"),
    (lambda c: c.update(rng={"bit_generator": "PCG64", "state": "nope"}), "field 'rng' is not a PCG64 generator state"),
    (lambda c: c.update(rng=[1, 2]), "field 'rng' is not a PCG64"),
    (lambda c: c.update(bytes_up=-1), "field 'bytes_up' = -1 is not a byte count"),
    (lambda c: c.update(summary={"accuracy": "high"}), "field 'summary.accuracy' is a str, not a number"),
    (lambda c: c.update(summary={"x) VALUES (1); --": 1}), "is not a field of a round's evaluation"),
    (lambda c: c.update(summary=[1]), "field 'summary' is a list"),
    (lambda c: c["downlink"].update(version=-2), "field 'downlink.version' = -2 is not a version"),
    (lambda c: c["downlink"].update(version=99), "field 'downlink.version' = 99 is not a version"),
    (lambda c: c["downlink"]["state"].update(w=torch.zeros(7)), r"field 'downlink.state.w' is torch.float32 \(7,\)"),
    (lambda c: c["downlink"]["state"].pop("w"), "field 'downlink.state' lacks tensor 'w'"),
    (lambda c: c.update(extra={"m": torch.tensor([float("inf")])}), "field 'extra.m' has NaN or infinite entries"),
])
def test_each_damaged_field_is_a_one_line_error_naming_it(tmp_path, change, match):
    _run(tmp_path, downlink=True)
    _tamper(tmp_path, 3, change, rebook=True)
    _refused(tmp_path, match)


def test_history_is_never_deleted_when_a_checkpoint_is_missing(tmp_path):
    _run(tmp_path)
    (tmp_path / "checkpoints" / "round-0003.pt").unlink()
    _refused(tmp_path, "the ledger has round 3 evaluated, but the newest checkpoint is of round 2")


def test_a_planted_checkpoint_is_refused(tmp_path):
    _run(tmp_path)
    (tmp_path / "checkpoints" / "round-0009.pt").write_bytes((tmp_path / "checkpoints" / "round-0003.pt").read_bytes())
    _refused(tmp_path, "round-0009.pt was never committed by run 'r'")


def test_a_changed_run_id_is_refused_not_started_over(tmp_path):
    _run(tmp_path)
    _refused(tmp_path, "names run 'other', but the ledger and checkpoints are of run 'r'", run="other")


@pytest.mark.parametrize("garbage", [b"not a database at all" * 100, b"SQLite format 3\x00" + b"\xff" * 4000],
                         ids=["text", "bad-header"])
def test_a_garbage_ledger_is_a_one_line_error(tmp_path, garbage):
    _run(tmp_path)
    (tmp_path / "ledger.sqlite").write_bytes(garbage)
    for extra in ("ledger.sqlite-wal", "ledger.sqlite-shm"):
        (tmp_path / extra).unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="ledger") as err:
        store = RunStore(tmp_path)
        try:
            store.resume_run("r", META, _strategy())
        finally:
            store.close()
    assert "\n" not in str(err.value)


def test_a_ledger_with_a_garbage_run_config_is_a_one_line_error(tmp_path):
    _run(tmp_path)
    db = sqlite3.connect(tmp_path / "ledger.sqlite")
    with db:
        db.execute("UPDATE runs SET config = '{not json'")
    db.close()
    _refused(tmp_path, "the ledger cannot be read back")


def test_resuming_a_finished_run_says_so_and_how_to_extend_it(mosquitto, tmp_path):
    from fedfleet.coordinator.job.config import JobConfig
    from fedfleet.coordinator.job.run import run_demo

    cfg = JobConfig(rounds=1, agents=2, fleet="resume-finished")
    run_demo(cfg, broker=mosquitto.url, run_dir=tmp_path, quiet=True, report="none")
    before = _history(tmp_path)
    with pytest.raises(ConfigError, match=r"already finished its 1 rounds .*resume with --rounds 11") as err:
        run_demo(cfg, broker=mosquitto.url, run_dir=tmp_path, quiet=True, resume=True, report="none")
    assert "\n" not in str(err.value)
    assert _history(tmp_path)[:2] == before[:2]
