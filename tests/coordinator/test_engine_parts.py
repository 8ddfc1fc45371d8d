"""The round engine's parts on their own, without a broker: the `Refusal` enum, `Validator`, `Phase` (with real
`PhaseBooks` on a real ledger), `Dispatcher` (signed downlink, byte counts) and `Presence`."""

from __future__ import annotations

import ast
import json
import pickle
import queue
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfleet.coordinator.engine.books import PhaseBooks
from fedfleet.coordinator.engine.dispatch import Dispatcher
from fedfleet.coordinator.engine.inbox import ChunkBytes, EnergyReport, Refused, ResultMessage
from fedfleet.coordinator.engine.phase import Accepted, Carry, Noted, Phase, Rejected
from fedfleet.coordinator.engine.presence import Presence
from fedfleet.coordinator.engine.receive import ReceivePath
from fedfleet.coordinator.engine.update_guard import UpdateGuard
from fedfleet.coordinator.engine.validate import Validator
from fedfleet.coordinator.records.ledger import Ledger
from fedfleet.coordinator.strategies import ClientResult, TaskSpec, create
from fedfleet.edge_agent.errors import CodecError, ProtocolError, Refusal
from fedfleet.edge_agent.wire import codecs, protocol, signing

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = [("w", (3, 2)), ("b", (3,))]
NONE = {"name": "none"}
TASK = TaskSpec(config={}, tensors={}, expect=LAYOUT, uplink_codec=NONE)


# ---------------------------------------------------------------- Refusal
def _raised_reasons() -> set[str]:
    """Every string literal given as a reason to ProtocolError, CodecError or StatsError in the source."""
    found: set[str] = set()
    for top in ("edge_agent", "coordinator", "tools"):
        for path in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call) or getattr(node.func, "id", None) not in (
                        "ProtocolError", "CodecError", "StatsError"):
                    continue
                args = [node.args[0]] if node.args and node.func.id != "CodecError" else []
                args += [k.value for k in node.keywords if k.arg == "reason"]
                found.update(a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return found


def test_every_reason_raised_in_the_code_is_a_refusal():
    reasons = _raised_reasons()
    assert {"replica", "shape", "negative_n", "too_many_pairs"} <= reasons  # the scan finds them
    assert reasons - {r.value for r in Refusal} == set()


def test_refusal_values_are_the_ledger_statuses():
    assert len({r.value for r in Refusal}) == len(Refusal)
    assert f"rejected:{Refusal.NORM_BOUND}" == Refusal.NORM_BOUND.status == "rejected:norm_bound"
    assert str(Refusal.SCHEMA) == "schema" and Refusal.SCHEMA == "schema"
    assert {"schema": 1}[Refusal.SCHEMA] == {Refusal.SCHEMA: 1}["schema"] == 1  # hashes as its value
    assert json.dumps({Refusal.SCHEMA: [Refusal.SHAPE]}) == '{"schema": ["shape"]}'
    assert ProtocolError("shape", "x").reason is Refusal.SHAPE  # the string value is accepted
    assert CodecError("bad").reason is Refusal.CODEC and str(CodecError("bad", reason="shape")) == "shape: bad"
    with pytest.raises(ValueError, match="not a refusal reason"):
        ProtocolError("no_such_reason")
    for err in (ProtocolError(Refusal.SPOOFED, "d"), CodecError("d", reason="oversized")):
        back = pickle.loads(pickle.dumps(err))
        assert (type(back), back.reason, back.detail, str(back)) == (type(err), err.reason, "d", str(err))


def test_which_refusals_answer_the_agents_own_task():
    replays = {Refusal.WRONG_RUN, Refusal.FUTURE_ROUND, Refusal.STALE_ROUND, Refusal.NOT_SELECTED, Refusal.LATE}
    assert {r for r in Refusal if not r.answers_task} == replays


# ---------------------------------------------------------------- Validator
def _header(**over) -> dict:
    h = {"kind": "result", "agent": "a1", "run": "run", "round": 3, "phase": 0, "method": "fedavg", "codec": NONE,
         "layout": [[n, list(s)] for n, s in LAYOUT], "meta": {"samples": 5, "learn_s": 0.5, "metrics": {"loss": 1}}}
    h.update(over)
    return h


def _body(value: float = 1.0) -> bytes:
    return codecs.encode({n: np.full(s, value, np.float32) for n, s in LAYOUT}, LAYOUT, NONE)


def _strategy():
    return create("fedavg", {n: torch.zeros(s) for n, s in LAYOUT})


def _validator(late=None, announced=None, **kw) -> Validator:
    return Validator(run="run", r=3, phase=0, tasks={"a1": TASK, "a2": TASK, "a3": TASK}, strategy=_strategy(),
                     guard=UpdateGuard(**kw), max_result_bytes=1 << 20, announced=announced or {},
                     late=late or {})


@pytest.mark.parametrize("header, task, duplicate, reason", [
    (_header(run="other"), TASK, False, Refusal.WRONG_RUN),
    (_header(round=4), TASK, False, Refusal.FUTURE_ROUND),
    (_header(phase=1), TASK, False, Refusal.FUTURE_ROUND),
    (_header(round=2), TASK, False, Refusal.STALE_ROUND),
    (_header(), None, False, Refusal.NOT_SELECTED),
    (_header(), TASK, True, Refusal.DUPLICATE),
    (_header(codec={"name": "zstd"}), TASK, False, Refusal.CODEC),
    (_header(layout=[["w", [3, 2]]]), TASK, False, Refusal.SHAPE),
])
def test_validator_refuses_with_the_reason(header, task, duplicate, reason):
    with pytest.raises(ProtocolError) as e:
        _validator().check("a1", header, _body(), task, duplicate=duplicate)
    assert e.value.reason is reason


def test_validator_decodes_and_refuses_nonfinite_and_short_payloads():
    v = _validator()
    with pytest.raises(ProtocolError) as e:
        v.check("a1", _header(), _body(float("nan")), TASK, duplicate=False)
    assert e.value.reason is Refusal.NONFINITE
    with pytest.raises(ProtocolError) as e:
        v.check("a1", _header(), _body()[:-4], TASK, duplicate=False)
    assert e.value.reason is Refusal.SHAPE
    result = v.check("a1", _header(), _body(2.0), TASK, duplicate=False)
    assert result.agent == "a1" and float(result.tensors["b"][0]) == 2.0
    # the claim, and the claim under the announcement, both before the cap (nothing announced here: the claim)
    assert result.metrics == {"loss": 1.0, "_learn_s": 0.5, "_samples_claimed": 5.0, "_samples_uncapped": 5.0}


def test_a_result_for_a_closed_phase_is_late_only_for_an_agent_booked_late_there():
    v = _validator(late={(2, 0): {"a1"}})
    with pytest.raises(ProtocolError) as e:
        v.check("a1", _header(round=2), _body(), TASK, duplicate=False)
    assert e.value.reason is Refusal.LATE
    with pytest.raises(ProtocolError) as e:
        v.check("a2", {**_header(round=2), "agent": "a2"}, _body(), TASK, duplicate=False)
    assert e.value.reason is Refusal.STALE_ROUND


def test_validator_weight_is_the_announced_count_under_the_phase_cap():
    v = _validator(announced={"a1": 3, "a2": 10, "a3": 10}, weight_cap=2.0)
    assert v.weight_limit == 20
    assert v.check("a1", _header(), _body(), TASK, duplicate=False).samples == 3  # claimed 5, announced 3
    big = _header(meta={"samples": 10**6, "learn_s": 0.0})
    assert v.check("a2", big, _body(), TASK, duplicate=False).samples == 10  # its announcement


def test_validator_bound_refuses_an_outlying_update():
    v = _validator(norm_bound=3.0)
    results = [ClientResult(a, {n: np.full(s, x, np.float32) for n, s in LAYOUT}, 1)
               for a, x in (("a1", 1.0), ("a2", 1.1), ("a3", 100.0))]
    screened = v.bound(results)
    assert [r.agent for r in screened.kept] == ["a1", "a2"] and [r.agent for r, *_ in screened.refused] == ["a3"]


# ---------------------------------------------------------------- Phase
@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite")
    yield led
    led.close()


def _phase(ledger, *, tasks=None, reject_rows=16, carry=None, inbox=None, cohort=None) -> tuple[Phase, queue.Queue]:
    tasks = {"a1": TASK, "a2": TASK} if tasks is None else tasks
    inbox = inbox if inbox is not None else queue.Queue()
    receive = ReceivePath(fleet="f", keys={a: bytes(32) for a in tasks}, inbox=inbox, on_status=lambda a, s: None,
                          max_result_bytes=1 << 20)
    carry = carry if carry is not None else Carry()
    validator = Validator(run="run", r=3, phase=0, tasks=tasks, strategy=_strategy(), guard=UpdateGuard(),
                          max_result_bytes=1 << 20, announced={}, late=carry.late)
    books = PhaseBooks(ledger, run="run", r=3, phase=0, reject_rows=reject_rows)
    return Phase(run="run", r=3, phase=0, tasks=tasks, validator=validator, books=books, carry=carry, inbox=inbox,
                 receive=receive, cohort=cohort), inbox


def _rows(ledger) -> list[tuple]:
    return [tuple(r) for r in ledger.query(
        "SELECT agent, status, bytes_up, bytes_down, energy_compute_j FROM agent_rounds ORDER BY rowid")]


def test_phase_books_results_refusals_and_late_agents(ledger):
    phase, _ = _phase(ledger)
    phase.dispatched("a1", 100)
    phase.dispatched("a2", 200)
    assert isinstance(phase.offer(ChunkBytes("a1", 40)), Noted)
    out = phase.offer(ResultMessage("a1", _header(meta={"samples": 5, "learn_s": 0.0, "energy": True}), _body()))
    assert isinstance(out, Accepted) and out.result.agent == "a1"
    assert isinstance(phase.offer(EnergyReport("a1", "run", 3, 0, 1.5, 0.5, 0.25)), Noted)  # rides on a1's row
    refused = phase.offer(Refused("a2", Refusal.SCHEMA, "meta: bad", 30, run="run", round=2, phase=0))
    assert isinstance(refused, Rejected) and not refused.closes_slot  # it named another round
    assert phase.waiting == ["a2"] and not phase.answered
    outcome = phase.close()
    assert ([r.agent for r in outcome.results], outcome.rejected, outcome.late) == (["a1"], 1, ["a2"])
    assert _rows(ledger) == [("a2", "rejected:schema", 30, 0, None), ("a1", "ok", 40, 100, 1.5),
                             ("a2", "late", 0, 200, None)]
    assert phase.carry.late[(3, 0)] == {"a2"} and phase.carry.energy_due == set()


def test_over_selection_aggregates_the_first_cohort_and_books_the_rest_surplus(ledger):
    carry = Carry()
    tasks = {a: TASK for a in ("a1", "a2", "a3", "a4")}
    phase, inbox = _phase(ledger, tasks=tasks, carry=carry, cohort=2)
    for i, a in enumerate(tasks):
        phase.dispatched(a, 100 + i)
    assert isinstance(phase.offer(ResultMessage("a2", _header(agent="a2"), _body())), Accepted) and not phase.full
    nan = phase.offer(ResultMessage("a1", _header(agent="a1"), _body(float("nan"))))
    assert isinstance(nan, Rejected) and nan.reason is Refusal.NONFINITE  # a refused result never fills the cohort
    assert isinstance(phase.offer(ResultMessage("a3", _header(agent="a3"), _body())), Accepted) and phase.full
    assert not phase.answered and phase.waiting == ["a4"]
    inbox.put(ResultMessage("a4", _header(agent="a4", codec={"name": "zstd"}), _body()))  # bad: still refused
    outcome = phase.close()
    assert sorted(r.agent for r in outcome.results) == ["a2", "a3"] and outcome.late == [] and outcome.surplus == []
    assert [(a, s) for a, s, *_ in _rows(ledger)] == [("a1", "rejected:nonfinite"), ("a4", "rejected:codec"),
                                                    ("a2", "ok"), ("a3", "ok")]


def test_over_selection_books_valid_results_after_the_cohort_and_unanswered_agents_surplus(ledger):
    carry = Carry()
    tasks = {a: TASK for a in ("a1", "a2", "a3", "a4")}
    phase, inbox = _phase(ledger, tasks=tasks, carry=carry, cohort=2)
    for i, a in enumerate(tasks):
        phase.dispatched(a, 100 + i)
    phase.offer(ChunkBytes("a1", 11))
    for a in ("a1", "a2"):
        assert isinstance(phase.offer(ResultMessage(a, _header(agent=a), _body())), Accepted)
    phase.offer(ChunkBytes("a3", 13))
    late_valid = phase.offer(ResultMessage("a3", _header(agent="a3"), _body()))  # checked, then booked surplus
    assert isinstance(late_valid, Noted) and phase.full and phase.waiting == ["a4"]
    dup = phase.offer(ResultMessage("a3", _header(agent="a3"), _body()))
    assert isinstance(dup, Rejected) and dup.reason is Refusal.DUPLICATE
    outcome = phase.close()
    assert sorted(r.agent for r in outcome.results) == ["a1", "a2"]
    assert (outcome.late, outcome.surplus) == ([], ["a3", "a4"])
    rows = _rows(ledger)
    assert ("a3", "surplus", 13, 102, None) in rows and ("a4", "surplus", 0, 103, None) in rows
    assert [s for _, s, *_ in rows].count("ok") == 2 and "late" not in [s for _, s, *_ in rows]
    assert carry.late[(3, 0)] == {"a4"}
    details = dict(ledger.query("SELECT agent, detail FROM agent_rounds WHERE status = 'surplus'"))
    assert "after the cohort of 2 was full" in details["a3"] and "no result before" in details["a4"]
    assert ("a3", "rejected:duplicate", 13, 0, None) in rows  # as for a received agent: the task's bytes stay on one row


def test_without_a_cohort_a_phase_is_never_full(ledger):
    phase, _ = _phase(ledger, tasks={"a1": TASK})
    phase.offer(ResultMessage("a1", _header(), _body()))
    assert not phase.full and phase.answered and phase.close().surplus == []


def test_a_refusal_that_answers_the_task_closes_the_slot_and_carries_the_task_bytes(ledger):
    phase, _ = _phase(ledger, tasks={"a1": TASK})
    phase.dispatched("a1", 100)
    out = phase.offer(ResultMessage("a1", _header(codec={"name": "zstd"}), _body()))
    assert isinstance(out, Rejected) and out.reason is Refusal.CODEC and out.closes_slot
    assert phase.answered
    assert phase.close().late == []
    assert _rows(ledger) == [("a1", "rejected:codec", 0, 100, None)]


def test_refusals_past_the_row_cap_are_summed_in_one_row(ledger):
    phase, _ = _phase(ledger, tasks={"a1": TASK}, reject_rows=2)
    for _ in range(5):
        assert isinstance(phase.offer(Refused("a1", Refusal.MALFORMED, "x", 10)), Rejected)
    phase.close()
    statuses = [r[1] for r in _rows(ledger)]
    assert statuses == ["rejected:malformed", "rejected:malformed", "late", "rejected:rate_limited"]


def test_a_closed_phase_still_books_late_energy_and_counts_chunks_as_late_bytes(ledger):
    carry = Carry()
    phase, _ = _phase(ledger, tasks={"a1": TASK}, carry=carry)
    phase.offer(ResultMessage("a1", _header(), _body()))
    phase.close()
    phase.offer(ChunkBytes("a1", 7))
    assert carry.late_bytes == {"a1": 7}
    phase.offer(EnergyReport("a1", "run", 3, 0, 2.0, 1.0, 0.5))
    phase.offer(EnergyReport("a1", "another-run", 3, 0, 9.0, 9.0, 9.0))  # not this run's: ignored
    assert _rows(ledger) == [("a1", "ok", 0, 0, 2.0)]
    with pytest.raises(TypeError):
        phase.offer(("result", "a1", {}, b"", 0))  # type: ignore[arg-type]


# ---------------------------------------------------------------- Dispatcher and Presence
class _Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bool]] = []

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        self.sent.append((topic, payload, retain))
        return protocol.mqtt_publish_bytes(topic, len(payload))


def test_dispatcher_signs_what_it_sends_and_counts_the_bytes():
    seed = bytes(range(32))
    link = _Recorder()
    d = Dispatcher(link=link, fleet="f", run="run", method="fedavg", signing_key=seed, package=b"pkg" * 10,
                   ttl_s=30.0, downlink={"name": "none"}, sync=None)
    sent = d.publish_package()
    task = TaskSpec(config={"lr": 0.1}, tensors={"w": np.ones((3, 2), np.float32)}, expect=LAYOUT)
    got = d.dispatch("a1", 3, 0, task)
    assert d.bytes_down == sent + got
    topics = [t for t, _, _ in link.sent]
    assert topics[0] == "fedfleet/v1/f/broadcast/model/0" and topics[-1] == "fedfleet/v1/f/agents/a1/task"
    assert all(p == b"" and retain for _, p, retain in link.sent[1:-1])  # leftover model chunks cleared
    header, payload = protocol.open_signed(link.sent[-1][1], signing.public_key(seed))
    assert list(header)[:13] == ["kind", "fleet", "agent", "run", "round", "phase", "method", "codec", "layout",
                                 "sent", "ttl", "model", "meta"]
    assert header["model"] == d.package_digest and header["meta"]["config"] == {"lr": 0.1}
    assert codecs.decode(payload, [("w", (3, 2))], header["codec"], max_bytes=1 << 10)["w"].sum() == 6


def test_presence_ready_agents_and_announced_counts():
    p = Presence(["a1", "a2", "a3"])
    p.on_status("a1", {"state": "online", "model": "d1", "samples": 12})
    p.on_status("a2", {"state": "online", "model": "old", "samples": 0})
    p.on_status("a3", {"state": "offline", "model": "d1", "samples": 5})
    assert p.ready_agents("d1") == ["a1"]
    assert p.announced(["a1", "a2", "a3", "a4"]) == {"a1": 12, "a3": 5}
    with pytest.raises(TimeoutError, match="only 1 of 2"):
        p.wait_for_agents(2, 0.2, digest=lambda: "d1", publish=lambda: 0)


def test_only_the_coordinators_own_state_chunks_count_as_its_broadcast_echo():
    """Junk published on the state topic (no key needed on an anonymous broker) neither releases the dispatch
    barrier nor accumulates: only digests of the chunks just published are kept."""
    import hashlib
    import threading
    import types

    from fedfleet.coordinator.engine.rounds import Coordinator

    c = Coordinator.__new__(Coordinator)
    c._state_topic = "fedfleet/v1/f/broadcast/state"
    c._echo_lock, c._echoed, c._state_out = threading.Lock(), set(), threading.Event()
    chunks = [b"chunk-0", b"chunk-1"]
    c.dispatcher = types.SimpleNamespace(state_chunks={hashlib.sha256(x).digest() for x in chunks})
    for junk in (b"", b"x" * 1000, b"chunk-2"):
        c._on_message(c._state_topic, junk)
    assert not c._state_out.is_set() and not c._echoed
    c._on_message(c._state_topic, chunks[0])
    assert not c._state_out.is_set()
    c._on_message(c._state_topic, chunks[1])
    assert c._state_out.is_set() and len(c._echoed) == 2
