"""Hostile result payloads through the coordinator's real receive path (envelope, reassembly, validation,
codec decoding) and a real `Phase` (offer, close), without a broker: every one is refused with a reason,
recorded, and nothing crashes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedfleet.coordinator.engine.phase import Accepted, Noted, Phase, Rejected
from fedfleet.coordinator.engine.rounds import Coordinator, EngineConfig
from fedfleet.coordinator.records.ledger import Ledger
from fedfleet.coordinator.strategies import TaskSpec, create
from fedfleet.edge_agent import fedzip
from fedfleet.edge_agent.wire import codecs, protocol

SECRET = b"receive-path-secret-0123456789abcd"
LAYOUT = [("fc0.weight", (32, 64)), ("fc0.bias", (32,)), ("fc1.weight", (10, 32)), ("fc1.bias", (10,))]
FEDZIP = {"name": "fedzip", "z": 0.05, "k": 3, "encoding": "e4"}


@pytest.fixture
def coord(tmp_path):
    state = {n: torch.zeros(s) for n, s in LAYOUT}
    c = Coordinator(broker_url="mqtt://127.0.0.1:1", secret=SECRET, roster=["a1"], strategy=create("fedavg", state),
                    package=b"pkg", evaluate=lambda ctx, s: (0.0, 0.0), run_dir=tmp_path,
                    config=EngineConfig(fleet="f", run="run"), signing_key=bytes(32))
    yield c
    c.ledger.close()


def _envelopes(payload: bytes, *, codec: dict | None = None, layout=LAYOUT) -> list[bytes]:
    header = {"kind": "result", "fleet": "f", "agent": "a1", "run": "run", "round": 3, "phase": 0,
              "method": "fedavg", "codec": codec or FEDZIP, "layout": [[n, list(s)] for n, s in layout],
              "meta": {"samples": 5, "learn_s": 0.1, "metrics": {}}}
    return protocol.split(header, payload, protocol.derive_key(SECRET, "a1"))


TASK = TaskSpec(config={}, tensors={}, expect=LAYOUT, uplink_codec=FEDZIP)


def _phase(coord: Coordinator, r: int = 3, tasks: dict | None = None) -> Phase:
    return coord.open_phase(r, 0, {"a1": TASK} if tasks is None else tasks)


def _offer(coord: Coordinator, phase: Phase, messages: list[bytes]) -> list[str]:
    """Deliver `messages` on a1's result topic and offer what the receive path queued: the verdicts."""
    for m in messages:
        coord.receive.on_message("fedfleet/v1/f/agents/a1/result", m)
    outcomes = []
    while not coord.inbox.empty():
        out = phase.offer(coord.inbox.get_nowait())
        assert isinstance(out, (Accepted, Rejected, Noted))
        if not isinstance(out, Noted):
            outcomes.append("ok" if isinstance(out, Accepted) else "rejected")
    return outcomes


def _deliver(coord: Coordinator, messages: list[bytes]) -> list[str]:
    """`messages` in a phase of their own, closed after them."""
    phase = _phase(coord)
    outcomes = _offer(coord, phase, messages)
    phase.close()
    return outcomes


def _good() -> bytes:
    rng = np.random.default_rng(0)
    return fedzip.encode({n: rng.normal(size=s).astype(np.float32) for n, s in LAYOUT},
                         fedzip.FedZipParams.from_dict({k: v for k, v in FEDZIP.items() if k != "name"}))


def hostile_payloads() -> dict[str, bytes]:
    good = _good()
    rng = np.random.default_rng(1)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    return {
        "empty": b"",
        "garbage": rng.bytes(300),
        "truncated": good[: len(good) // 2],
        "one_byte_short": good[:-1],
        "appended": good + b"\x00",
        "bit_flip": bytes(flipped),
        "zstd_bomb": zstandard.ZstdCompressor().compress(bytes(100_000_000)),
        "dense_floats": codecs.pack({n: np.ones(s, np.float32) for n, s in LAYOUT}, LAYOUT),
    }


@pytest.mark.parametrize("name", list(hostile_payloads()))
def test_hostile_fedzip_payloads_are_refused_and_recorded(coord, name):
    outcomes = _deliver(coord, _envelopes(hostile_payloads()[name]))
    rows = [dict(r) for r in coord.ledger.query("SELECT agent, status, detail FROM agent_rounds")]
    if outcomes == ["ok"]:  # a bit flip may still decode: then it must be finite and of the right shapes
        assert name == "bit_flip"
        return
    assert outcomes == ["rejected"], (name, outcomes)
    assert rows and rows[-1]["status"].startswith("rejected:"), rows


def test_good_fedzip_payload_is_accepted_and_decodes_to_quantized(coord):
    assert _deliver(coord, _envelopes(_good())) == ["ok"]
    rows = [dict(r) for r in coord.ledger.query("SELECT status, codec FROM agent_rounds")]
    assert rows == [{"status": "ok", "codec": "fedzip"}]


def test_a_closed_phase_returns_its_outcome_and_books_the_silent_agent_late(coord):
    phase = _phase(coord, tasks={"a1": TASK, "a2": TASK})
    phase.dispatched("a1", 100)
    phase.dispatched("a2", 200)
    assert _offer(coord, phase, _envelopes(_good())) == ["ok"]
    assert phase.waiting == ["a2"] and not phase.answered
    outcome = phase.close()
    assert (outcome.selected, [r.agent for r in outcome.results], outcome.rejected, outcome.late) == (
        ["a1", "a2"], ["a1"], 0, ["a2"])
    rows = [dict(r) for r in coord.ledger.query("SELECT agent, status, bytes_down FROM agent_rounds ORDER BY agent")]
    assert rows == [{"agent": "a1", "status": "ok", "bytes_down": 100},
                    {"agent": "a2", "status": "late", "bytes_down": 200}]
    with pytest.raises(RuntimeError):
        phase.close()


def test_a_result_queued_when_the_phase_closes_still_counts(coord):
    phase = _phase(coord)
    for m in _envelopes(_good()):
        coord.receive.on_message("fedfleet/v1/f/agents/a1/result", m)
    outcome = phase.close()  # nothing offered yet: close drains the inbox
    assert [r.agent for r in outcome.results] == ["a1"] and outcome.late == []
    assert [r["status"] for r in coord.ledger.query("SELECT status FROM agent_rounds")] == ["ok"]


def test_a_late_result_adds_its_bytes_to_the_late_row(coord):
    first = _phase(coord)
    first.dispatched("a1", 10)
    assert first.close().late == ["a1"]
    later = _phase(coord, r=4, tasks={})  # a1 has no task now: its chunks' bytes are held for its late row
    assert _offer(coord, later, _envelopes(_good())) == []  # neither accepted nor refused: noted on its late row
    rows = [dict(r) for r in coord.ledger.query("SELECT round, status, bytes_up FROM agent_rounds")]
    assert len(rows) == 1 and rows[0]["round"] == 3 and rows[0]["status"] == "late" and rows[0]["bytes_up"] > 0


def test_codec_and_layout_mismatches_are_refused(coord):
    assert _deliver(coord, _envelopes(_good(), codec={"name": "zstd"})) == ["rejected"]
    assert _deliver(coord, _envelopes(_good(), layout=LAYOUT[:2])) == ["rejected"]
    statuses = [r["status"] for r in coord.ledger.query("SELECT status FROM agent_rounds")]
    assert statuses == ["rejected:codec", "rejected:shape"]


def test_a_reader_can_open_the_ledger_while_the_coordinator_writes(coord, tmp_path):
    _deliver(coord, _envelopes(b"junk"))
    other = Ledger(tmp_path / "ledger.sqlite")
    try:
        assert len(other.query("SELECT * FROM agent_rounds")) == 1
    finally:
        other.close()


def test_replayed_result_is_refused_in_the_same_and_in_a_later_round(coord):
    messages = _envelopes(_good())
    phase = _phase(coord)
    assert _offer(coord, phase, messages) == ["ok"]
    assert _offer(coord, phase, messages) == ["rejected"]  # same round: a duplicate
    phase.close()
    later = _phase(coord, r=4)
    assert _offer(coord, later, messages) == ["rejected"]
    assert later.waiting == ["a1"]  # a replayed old result does not close the agent's slot
    statuses = [r["status"] for r in coord.ledger.query("SELECT status FROM agent_rounds")]
    assert statuses == ["rejected:duplicate", "ok", "rejected:stale_round"]


def test_bad_fedzip_parameters_are_typed_codec_errors_not_crashes():
    """Unknown FedZip fields and an out-of-range z used to escape the decoder as ConfigError."""
    from fedfleet.edge_agent.errors import CodecError

    for spec in (dict(FEDZIP, bogus=1), dict(FEDZIP, z=7.0), dict(FEDZIP, z=float("nan")), dict(FEDZIP, k="x")):
        with pytest.raises(CodecError) as e:
            codecs.decode(_good(), LAYOUT, spec, max_bytes=1 << 24)
        assert e.value.reason == "codec"


@pytest.mark.parametrize("codec", [dict(FEDZIP, bogus=1), dict(FEDZIP, z=7.0), dict(FEDZIP, z=0.5)])
def test_codec_parameters_must_equal_the_tasks(coord, codec):
    """The result is decoded with the task's spec; any difference in the header's codec is refused."""
    assert _deliver(coord, _envelopes(_good(), codec=codec)) == ["rejected"]
    assert [r["status"] for r in coord.ledger.query("SELECT status FROM agent_rounds")] == ["rejected:codec"]


@pytest.mark.parametrize("meta, reason", [
    ({"samples": 5, "learn_s": 0.1, "metrics": [1, 2]}, "schema"),
    ({"samples": 5, "learn_s": "fast", "metrics": {}}, "schema"),
    ({"samples": 2**31, "learn_s": 0.1, "metrics": {}}, "schema"),
    ({"samples": True, "learn_s": 0.1, "metrics": {}}, "schema"),
    ({"samples": 5, "learn_s": 0.1, "metrics": {"loss": "low"}}, "schema"),
    ({"samples": 2**70, "learn_s": 0.1, "metrics": {}}, "malformed"),
])
def test_schema_of_every_meta_field(coord, meta, reason):
    header = {"kind": "result", "fleet": "f", "agent": "a1", "run": "run", "round": 3, "phase": 0,
              "method": "fedavg", "codec": FEDZIP, "layout": [[n, list(s)] for n, s in LAYOUT], "meta": meta}
    msgs = protocol.split(header, _good(), protocol.derive_key(SECRET, "a1"))
    assert _deliver(coord, msgs) == ["rejected"]
    # a header that does not parse names no round: its refusal does not answer a1's task, which ends late
    late = ["late"] if reason == "malformed" else []
    assert [r["status"] for r in coord.ledger.query("SELECT status FROM agent_rounds")] == [f"rejected:{reason}", *late]


def test_unauthenticated_messages_are_counted_not_queued(coord):
    for i in range(500):
        coord.receive.on_message(f"fedfleet/v1/f/agents/ghost{i}/result", b"\x00junk")
        coord.receive.on_message("fedfleet/v1/f/agents/a1/result", b"FFLT\x02\x01" + bytes(80))
    assert coord.inbox.empty()  # nothing reaches the engine, nothing can close a phase
    _phase(coord, tasks={}).close()
    rows = [dict(r) for r in coord.ledger.query("SELECT agent, status, detail FROM agent_rounds")]
    assert [(r["agent"], r["status"]) for r in rows] == [("(unauthenticated)", "rejected:bad_hmac"),
                                                          ("(unauthenticated)", "rejected:unknown_agent")]
    assert rows[0]["detail"].startswith("500 ") and rows[1]["detail"].startswith("500 ")


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
_FIELDS = ["kind", "fleet", "agent", "run", "round", "phase", "method", "codec", "layout", "chunk", "msg", "digest",
           "total", "sent", "meta", "seq"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_receive_path_never_raises_untyped(coord, data):
    """Random bytes without a key, and headers mutated field by field and re-signed with the device key, on
    every uplink topic: the network side never raises, and every item it queues is refused or accepted by the
    engine with a typed reason."""
    kind = data.draw(st.sampled_from(["result", "status", "telemetry"]))
    topic = f"fedfleet/v1/f/agents/a1/{kind}"
    if data.draw(st.booleans()):
        coord.receive.on_message(topic, data.draw(st.binary(max_size=300)))
    else:
        header = {"kind": kind, "fleet": "f", "agent": "a1", "run": "run", "round": 3, "phase": 0,
                  "method": "fedavg", "codec": FEDZIP, "layout": [[n, list(s)] for n, s in LAYOUT],
                  "meta": {"samples": 5, "learn_s": 0.1, "metrics": {}}, "seq": [1, data.draw(st.integers(0, 9))]}
        for name in data.draw(st.lists(st.sampled_from(_FIELDS), max_size=3)):
            header[name] = data.draw(_json)
        body = _good() if kind == "result" else json.dumps(data.draw(_json), allow_nan=True).encode()
        head = json.dumps(header, allow_nan=True).encode()
        coord.receive.on_message(topic, _raw_sealed(head, body))
    phase = _phase(coord)
    while not coord.inbox.empty():
        phase.offer(coord.inbox.get_nowait())  # raises only on an untyped error


def _raw_sealed(head: bytes, payload: bytes) -> bytes:
    import hashlib
    import hmac

    body = protocol._PREFIX.pack(protocol.MAGIC, protocol.VERSION, protocol.AUTH_HMAC, len(head)) + head
    body += protocol._LEN.pack(len(payload)) + payload
    return body + hmac.new(protocol.derive_key(SECRET, "a1"), body, hashlib.sha256).digest()
