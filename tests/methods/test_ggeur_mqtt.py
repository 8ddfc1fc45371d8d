"""GGEUR over a real Mosquitto: the statistics exchange with hostile uploads refused row by row while the
phase completes on the others, then FedAvg on the augmented embeddings learns; and the demo on the
embedded broker."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from fedfleet.coordinator.job.assemble import build_run
from fedfleet.coordinator.job.config import JobConfig
from fedfleet.coordinator.job.run import run_demo
from fedfleet.coordinator.records.ledger import Ledger
from fedfleet.coordinator.strategies import create as create_strategy
from fedfleet.coordinator.tasks.packaged import PackagedTask
from fedfleet.edge_agent import class_stats
from fedfleet.edge_agent.agent import Agent, AgentConfig
from fedfleet.edge_agent.learners import LearnResult, LocalData, Task
from fedfleet.edge_agent.wire import codecs, protocol
from fedfleet.models import data as datasets
from fedfleet.tools.bench.ggeur import package
from tests.support.fleet import COORDINATOR_KEY, SECRET, SIGNING_KEY

_PACKAGE: list[Any] = []


def linear_package():
    if not _PACKAGE:
        _PACKAGE.extend(package())
    return _PACKAGE


def _corrupt(kind: str, t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    t = {k: v.copy() for k, v in t.items()}
    if kind == "shape":
        t["cov"] = t["cov"][:, :-1]
    elif kind == "nonfinite":
        t["mean"][0, 0] = np.nan
    elif kind == "negative_n":
        t["n"][0] = -t["n"][0]
    elif kind == "unknown_class":
        t["classes"][-1] = 12
    elif kind == "not_psd":
        d = t["mean"].shape[1]
        t["cov"][0] = class_stats.pack_upper(np.diag(np.r_[np.ones(d - 1), -1.0]))
    elif kind == "psd_noise":  # a tiny negative eigenvalue, within round-off: accepted and clipped
        d = t["mean"].shape[1]
        cov = class_stats.unpack_upper(t["cov"][0], d)
        lam, vec = np.linalg.eigh(cov)
        cov -= (lam[0] + 1e-8 * lam[-1]) * np.outer(vec[:, 0], vec[:, 0])
        t["cov"][0] = class_stats.pack_upper((cov + cov.T) / 2)
    return t


class HostileAgent(Agent):
    """A real agent (its own MQTT connection, learner and signed envelopes) whose upload is tampered with
    in one stage: the layout it declares is that of the tampered tensors, as an attacker would send."""

    def __init__(self, *args: Any, stage: str, kind: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.stage, self.kind = stage, kind

    def _upload(self, header: dict[str, Any], task: Task, result: LearnResult, learn_s: float) -> None:
        if task.config.get("stage") != self.stage:
            return super()._upload(header, task, result, learn_s)
        tensors = {k: np.asarray(v, np.float32) for k, v in result.tensors.items()}
        if self.kind == "negative_census":
            tensors["counts"][0] = -5.0
        else:
            tensors = _corrupt(self.kind, tensors)
        expect = codecs.normalize_layout(header["meta"]["expect"])
        layout = [(n, tuple(tensors[n].shape)) for n, _ in expect]
        out = {"kind": "result", "fleet": self.cfg.fleet, "agent": self.cfg.agent_id, "run": task.run,
               "round": task.round, "phase": task.phase, "method": task.method, "codec": {"name": "none"},
               "layout": [[n, list(s)] for n, s in layout], "meta": {"samples": int(result.samples), "learn_s": 0.0}}
        for chunk in protocol.split(out, codecs.encode(tensors, layout, {"name": "none"}), self.cfg.key):
            self.link.publish(self._result_topic, chunk)


HOSTILE = {"h-shape": ("stats", "shape"), "h-nan": ("stats", "nonfinite"), "h-negn": ("stats", "negative_n"),
           "h-class": ("stats", "unknown_class"), "h-psd": ("stats", "not_psd"), "h-noise": ("stats", "psd_noise"),
           "h-census": ("census", "negative_census")}


def test_statistics_exchange_refuses_bad_uploads_and_the_fleet_learns(mosquitto, tmp_path):
    blob, cmodel = linear_package()
    train, test = datasets.split(datasets.digits(), 0.2, seed=0)
    ids = ["honest-0", "honest-1", "honest-2", *HOSTILE]
    parts = datasets.partition_dirichlet(train.y, len(ids), 0.5, seed=0, per_class=1)
    shards = {a: LocalData(train.x[p], train.y[p]) for a, p in zip(ids, parts)}
    strategy = create_strategy("ggeur", cmodel.initial_state(), lr=0.1, epochs=2, batch=16, guide="all", seed=0)
    fleet = f"gg{time.time_ns() % 10**9}"
    job = JobConfig(method="ggeur", fleet=fleet, agents=len(ids), roster=ids, deadline_s=30.0, quorum=0.5,
                    grace_s=0.0, downlink="none")
    coord = build_run(job, broker_url=mosquitto.url, secret=SECRET, signing_key=SIGNING_KEY, run_dir=tmp_path,
                      run_id="gg", strategy=strategy,
                      task=PackagedTask(blob, cmodel, list(shards.values()), test)).coordinator
    agents = []
    try:
        coord.start()
        for a in ids:
            cfg = AgentConfig(mosquitto.url, fleet, a, protocol.derive_key(SECRET, a), coordinator_key=COORDINATOR_KEY)
            agent = HostileAgent(cfg, shards[a], stage=HOSTILE[a][0], kind=HOSTILE[a][1]) if a in HOSTILE \
                else Agent(cfg, shards[a])
            agent.start()
            agents.append(agent)
        coord.wait_for_agents(len(ids), 60)
        summaries = coord.run(3)
    finally:
        for agent in agents:
            agent.stop()
        coord.stop()
    ledger = Ledger(tmp_path / "ledger.sqlite")
    rows = [dict(r) for r in ledger.query("SELECT round, phase, agent, status, bytes_up FROM agent_rounds")]
    ledger.close()
    status = {(r["round"], r["phase"], r["agent"]): r["status"] for r in rows}
    assert status[(1, 0, "h-census")] == "rejected:negative_n"
    for agent, (stage, kind) in HOSTILE.items():
        if stage == "stats":
            want = "ok" if kind == "psd_noise" else f"rejected:{kind}"
            assert status[(1, 1, agent)] == want, (agent, status[(1, 1, agent)])
    assert (1, 1, "h-census") not in status  # no census, no statistics asked of it
    assert all(status[(1, 1, a)] == "ok" for a in ids[:3])
    # the classes were pooled over the honest agents and the one whose noise was clipped
    assert sorted(strategy.parsed) == ["h-noise", "honest-0", "honest-1", "honest-2"]
    assert sorted(strategy.geometry) == list(range(10))
    assert all((lam >= 0).all() for _, lam, _ in strategy.geometry.values())
    # the exchange phases are in the ledger with their bytes: about 2,145 floats per class up
    stats_up = sum(r["bytes_up"] for r in rows if (r["round"], r["phase"]) == (1, 1) and r["status"] == "ok")
    assert stats_up > 4 * 10 * 2145 * 4
    assert [s.ok for s in summaries[1:]] == [len(ids)] * 2  # later rounds: one training phase, everyone
    assert summaries[-1].accuracy > 0.85, [s.accuracy for s in summaries]
    assert strategy.delivered["honest-0"] > 0 and "h-census" not in strategy.delivered


def test_demo_runs_ggeur_end_to_end_on_the_embedded_broker(tmp_path):
    result = run_demo(JobConfig(method="ggeur", rounds=4, agents=4, alpha=0.1), run_dir=tmp_path, quiet=True)
    first = result.summaries[0]
    assert first.ok == first.selected and first.rejected == 0 and 4 * 3 < first.selected <= 4 * 4
    assert [s.ok for s in result.summaries[1:]] == [4, 4, 4]
    assert result.final_accuracy > 0.85, [s.accuracy for s in result.summaries]
    assert "synthetic" in first.note


def test_demo_runs_ggeur_on_mosquitto_and_learns(mosquitto, tmp_path):
    cfg = JobConfig(method="ggeur", rounds=3, agents=5, alpha=0.1, fleet=f"ggd{time.time_ns() % 10**9}")
    result = run_demo(cfg, broker=mosquitto.url, run_dir=tmp_path, quiet=True)
    first = result.summaries[0]  # census, train: everyone; statistics: the guides; geometry: every holder
    assert first.ok == first.selected and first.rejected == 0 and 5 * 3 < first.selected <= 5 * 4
    assert [s.ok for s in result.summaries[1:]] == [5, 5]
    assert result.final_accuracy > 0.85, [s.accuracy for s in result.summaries]
    ledger = Ledger(tmp_path / "ledger.sqlite")
    phases = [r["phase"] for r in ledger.query("SELECT phase FROM agent_rounds WHERE round = 1 AND status = 'ok'")]
    ledger.close()
    assert sorted(set(phases)) == [0, 1, 2, 3]  # census, stats, geometry, train: each phase its own rows


def test_bench_ggeur_smoke(tmp_path, capsys):
    from fedfleet.tools.bench import ggeur as bench_ggeur
    from fedfleet.tools.bench.output import details

    out = tmp_path / "ggeur.json"
    assert bench_ggeur.main(["--quick", "--agents", "4", "--broker", "mosquitto", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == set(bench_ggeur.KEYS)
    captured = capsys.readouterr()
    assert json.loads(captured.out) == result
    assert result["seeds"] == 1 and result["beta"] == 0.05 and result["broker"] == "mosquitto"
    assert set(result["cells"]) == {"beta0.05/linear/guarantee", "beta0.05/linear/no_guarantee"}
    c = result["cells"]["beta0.05/linear/guarantee"]
    assert abs(result["gain_points_sync"] - 100 * (c["sync_ggeur"] - c["sync_plain"])) < 0.02
    assert abs(result["gain_points_unsync"] - 100 * (c["unsync_ggeur"] - c["unsync_plain"])) < 0.02
    assert all(0 < c[k] <= 1 for k in ("sync_plain", "sync_ggeur", "unsync_plain", "unsync_ggeur", "central"))
    more = details(captured.err)["digits_backbone"]
    assert more["guarantee"]["stats_bytes_up"] > 4 * 2145 * 4  # at least one class's n, mean and triangle per agent
    assert len(more["domain_toy"]["ggeur_per_domain"]) == 4 and more["not_ok"] == 0
