"""The wire contract: envelopes, HMAC, chunking, caps, topics and byte accounting."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent import codecs, protocol
from edge_agent.errors import CodecError, ProtocolError

KEY = bytes(range(32))


def _open(msg: bytes, key: bytes = KEY) -> tuple[dict, bytes]:
    return protocol.open_envelope(msg, lambda h: key)


def test_seal_open_round_trip():
    msg = protocol.seal({"kind": "result", "agent": "a", "round": 3}, b"payload", KEY)
    header, payload = _open(msg)
    assert header == {"kind": "result", "agent": "a", "round": 3}
    assert payload == b"payload"


def test_every_truncation_and_bit_flip_is_refused():
    msg = protocol.seal({"kind": "result", "agent": "a"}, b"x" * 50, KEY)
    for cut in range(len(msg)):
        with pytest.raises(ProtocolError):
            _open(msg[:cut])
    for i in range(0, len(msg), 7):
        bad = bytearray(msg)
        bad[i] ^= 0x01
        with pytest.raises(ProtocolError):
            _open(bytes(bad))


def test_wrong_key_is_bad_hmac_and_unknown_sender_is_unknown_agent():
    msg = protocol.seal({"kind": "result", "agent": "a"}, b"p", KEY)
    with pytest.raises(ProtocolError) as e:
        _open(msg, key=b"k" * 32)
    assert e.value.reason == "bad_hmac"
    with pytest.raises(ProtocolError) as e:
        protocol.open_envelope(msg, lambda h: None)
    assert e.value.reason == "unknown_agent"


def test_malformed_inputs_have_reasons():
    cases = {
        b"": "malformed",
        b"XXXX" + bytes(100): "malformed",
        b"FFLT\x09" + bytes(100): "version",
        b"FFLT\x01\xff\xff\xff\xff" + bytes(100): "malformed",
    }
    for data, reason in cases.items():
        with pytest.raises(ProtocolError) as e:
            _open(data)
        assert e.value.reason == reason
    head = b"[1,2]"
    body = b"FFLT\x01" + len(head).to_bytes(4, "big") + head + (0).to_bytes(4, "big")
    with pytest.raises(ProtocolError, match="JSON object"):
        _open(body + bytes(32))


def test_oversized_message_refused_before_parsing():
    with pytest.raises(ProtocolError) as e:
        _open(b"FFLT" + bytes(protocol.MAX_MESSAGE_BYTES))
    assert e.value.reason == "oversized"
    with pytest.raises(ProtocolError) as e:
        protocol.seal({"kind": "result"}, bytes(protocol.MAX_MESSAGE_BYTES), KEY)
    assert e.value.reason == "oversized"


@settings(max_examples=25, deadline=None)
@given(size=st.integers(0, 3 * 4096 + 5), chunk=st.sampled_from([1000, 4096]))
def test_chunking_reassembles_in_any_order(size: int, chunk: int):
    payload = np.random.default_rng(size).bytes(size)
    msgs = protocol.split({"kind": "result", "agent": "a"}, payload, KEY, chunk_bytes=chunk)
    assert all(len(m) <= protocol.MAX_MESSAGE_BYTES for m in msgs)
    r = protocol.Reassembler()
    out = None
    for m in reversed(msgs):
        out = r.add(*_open(m))
    assert out is not None and out[1] == payload


def test_reassembler_refuses_duplicates_caps_and_wrong_digest():
    payload = b"a" * 5000
    msgs = protocol.split({"kind": "result", "agent": "a"}, payload, KEY, chunk_bytes=2000)
    r = protocol.Reassembler()
    r.add(*_open(msgs[0]))
    with pytest.raises(ProtocolError) as e:
        r.add(*_open(msgs[0]))
    assert e.value.reason == "duplicate"
    small = protocol.Reassembler(max_total=1000)
    with pytest.raises(ProtocolError) as e:
        small.add(*_open(msgs[0]))
    assert e.value.reason == "oversized"
    header = {"kind": "result", "agent": "a", "chunk": [0, 1], "total": 3, "msg": "m", "digest": "0" * 64}
    with pytest.raises(ProtocolError) as e:
        protocol.Reassembler().add(header, b"abc")
    assert e.value.reason == "digest"
    bad = dict(header, chunk=[5, 2])
    with pytest.raises(ProtocolError):
        protocol.Reassembler().add(bad, b"abc")


def test_topics_and_ids():
    t = protocol.agent_topic("lab", "pi-07", "result")
    assert t == "fedfleet/v1/lab/agents/pi-07/result"
    assert protocol.parse_agent_topic(t) == ("lab", "pi-07", "result")
    assert protocol.parse_agent_topic("fedfleet/v1/lab/broadcast/model/0") is None
    assert protocol.valid_id("pi-07") and not protocol.valid_id("a/b") and not protocol.valid_id("+")
    assert protocol.derive_key(b"s" * 32, "a") != protocol.derive_key(b"s" * 32, "b")


def test_mqtt_bytes_count_header_topic_packet_id_and_puback():
    # 1 fixed byte + 1 length byte + 2 topic length + 1 topic + 2 packet id + 10 payload + 4 PUBACK
    assert protocol.mqtt_publish_bytes("t", 10, qos=1) == 1 + 1 + 2 + 1 + 2 + 10 + 4
    assert protocol.mqtt_publish_bytes("t", 200, qos=0) == 1 + 2 + 2 + 1 + 200


@pytest.mark.parametrize("name", ["none", "zstd"])
def test_tensor_codecs_round_trip_and_check_shapes(name: str):
    layout = [("w", (3, 4)), ("b", (4,))]
    rng = np.random.default_rng(0)
    t = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    data = codecs.encode(t, layout, {"name": name})
    back = codecs.decode(data, layout, {"name": name}, max_bytes=1 << 20)
    assert all(np.array_equal(back[k], t[k]) for k in t)
    with pytest.raises(CodecError):
        codecs.decode(data, [("w", (3, 5)), ("b", (4,))], {"name": name}, max_bytes=1 << 20)
    with pytest.raises(CodecError):
        codecs.decode(data[:-3], layout, {"name": name}, max_bytes=1 << 20)


def test_zstd_frame_declaring_a_huge_size_is_refused_before_decompressing():
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(bytes(50_000_000))
    assert len(bomb) < 10_000
    with pytest.raises(CodecError) as e:
        codecs.decode(bomb, [("w", (10,))], {"name": "zstd"}, max_bytes=1 << 20)
    assert e.value.reason in ("oversized", "codec")
    with pytest.raises(CodecError):
        codecs.decode(b"garbage", [("w", (10,))], {"name": "zstd"}, max_bytes=1 << 20)
    with pytest.raises(CodecError):
        codecs.check_spec({"name": "gzip"})
    assert json.loads(json.dumps(codecs.check_spec({"name": "zstd"})))


def test_long_headers_travel_zlib_compressed_and_header_bombs_are_refused():
    import zlib

    header = {"kind": "result", "agent": "a", "layout": [["fc0.weight", [32, 64]]] * 20, "note": "x" * 400}
    msg = protocol.seal(header, b"p", KEY)
    assert len(msg) < len(json.dumps(header)) // 2
    assert _open(msg) == (header, b"p")
    short = protocol.seal({"kind": "status"}, b"", KEY)
    assert b'{"kind":"status"}' in short  # short headers stay plain JSON
    for bad_head, reason in ((zlib.compress(b"{" + b" " * 10_000_000 + b"}"), "oversized"),
                             (zlib.compress(b'{"kind":"x"}')[:-3], "malformed"),
                             (b"\x78\x9c garbage", "malformed")):
        body = b"FFLT\x01" + len(bad_head).to_bytes(4, "big") + bad_head + (0).to_bytes(4, "big")
        with pytest.raises(ProtocolError) as e:
            _open(body + bytes(32))
        assert e.value.reason == reason, bad_head[:10]
