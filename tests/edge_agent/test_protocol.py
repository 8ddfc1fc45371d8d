"""The wire contract: envelopes, HMAC and Ed25519 signatures, strict headers, chunking, caps, topics and
byte accounting."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfleet.edge_agent.errors import CodecError, ProtocolError
from fedfleet.edge_agent.wire import codecs, protocol, signing

KEY = bytes(range(32))
SEED = bytes(range(1, 33))


def _open(msg: bytes, key: bytes = KEY) -> tuple[dict, bytes]:
    return protocol.open_envelope(msg, key)


def _raw(head: bytes, payload: bytes = b"", key: bytes = KEY) -> bytes:
    """A v2 uplink envelope around raw header bytes, with a valid HMAC (to test parsing after the MAC)."""
    import hashlib
    import hmac

    body = b"FFLT\x02\x01" + len(head).to_bytes(4, "big") + head + len(payload).to_bytes(4, "big") + payload
    return body + hmac.new(key, body, hashlib.sha256).digest()


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


def test_wrong_key_is_bad_hmac():
    msg = protocol.seal({"kind": "result", "agent": "a"}, b"p", KEY)
    with pytest.raises(ProtocolError) as e:
        _open(msg, key=b"k" * 32)
    assert e.value.reason == "bad_hmac"


def test_mac_is_checked_before_the_header_is_parsed():
    """A hostile header without the key is refused as bad_hmac: the parser never sees it."""
    for head in (b"[" * 5000 + b"]" * 5000, b'{"round": 1' + b"0" * 5000 + b"}", b"\x78garbage"):
        forged = _raw(head, key=b"x" * 32)
        with pytest.raises(ProtocolError) as e:
            _open(forged)
        assert e.value.reason == "bad_hmac"


@pytest.mark.parametrize("head", [
    b"[" * 900 + b"]" * 900,  # deeper than the interpreter's recursion limit allows comfortably
    b"{" + b'"a":{' * 20 + b"}" * 21,  # deeper than MAX_HEADER_DEPTH
    b"[" * 5000 + b"]" * 5000,  # too many brackets for the cheap pre-check
    b'{"round": 1' + b"0" * 5000 + b"}",  # longer than Python's int-from-string limit
    b'{"round": ' + str(2**70).encode() + b"}",  # does not fit 64 bits
    b'{"learn_s": 1e999}',  # overflows a float
    b'{"learn_s": NaN}', b'{"learn_s": Infinity}', b'{"learn_s": -Infinity}',
    b'{"x": "\xff\xfe"}',  # not UTF-8
])
def test_hostile_headers_under_a_valid_mac_are_typed_refusals(head):
    with pytest.raises(ProtocolError) as e:
        _open(_raw(head))
    assert e.value.reason == "malformed"


def test_signed_downlink_round_trip_and_refusals():
    pub = signing.public_key(SEED)
    msg = protocol.seal_signed({"kind": "task", "agent": "a"}, b"payload", SEED)
    assert protocol.open_signed(msg, pub) == ({"kind": "task", "agent": "a"}, b"payload")
    other = signing.public_key(bytes(32))
    with pytest.raises(ProtocolError) as e:
        protocol.open_signed(msg, other)
    assert e.value.reason == "bad_signature"
    resealed = bytearray(msg)
    resealed[20] ^= 1
    with pytest.raises(ProtocolError) as e:
        protocol.open_signed(bytes(resealed), pub)
    assert e.value.reason == "bad_signature"
    with pytest.raises(ProtocolError) as e:  # an HMAC-sealed envelope (e.g. under a once-public key)
        protocol.open_signed(protocol.seal({"kind": "model"}, b"x" * 100, KEY), pub)
    assert e.value.reason == "bad_auth"
    with pytest.raises(ProtocolError) as e:  # and the other way round
        protocol.open_envelope(msg, KEY)
    assert e.value.reason == "bad_auth"
    assert not hasattr(protocol, "broadcast_key")  # a public name is never a key


def test_signing_key_files(tmp_path):
    import os

    from fedfleet.edge_agent.errors import ConfigError

    path = tmp_path / "coordinator.key"
    seed = signing.new_signing_seed()
    signing.write_private_key_file(path, seed)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert signing.read_key_file(path, "--signing-key-file") == seed
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        signing.write_private_key_file(path, seed)
    (tmp_path / "bad").write_text("zz")
    for name in ("bad", "missing"):
        with pytest.raises(ConfigError, match=name):
            signing.read_key_file(tmp_path / name, "--coordinator-key-file")
    sig = signing.sign(seed, b"data")
    signing.verify(signing.public_key(seed), b"data", sig)
    with pytest.raises(ProtocolError):
        signing.verify(signing.public_key(seed), b"datA", sig)


def test_malformed_inputs_have_reasons():
    cases = {
        b"": "malformed",
        b"XXXX" + bytes(100): "malformed",
        b"FFLT\x09" + bytes(100): "version",
        b"FFLT\x01" + bytes(100): "version",  # the v1 wire format is refused, not misread
    }
    for data, reason in cases.items():
        with pytest.raises(ProtocolError) as e:
            _open(data)
        assert e.value.reason == reason
    bad_len = bytearray(_raw(b"{}"))
    with pytest.raises(ProtocolError) as e:
        _open(bytes(bad_len[:6]) + b"\xff\xff\xff\xff" + bytes(bad_len[10:]))
    assert e.value.reason == "bad_hmac"
    with pytest.raises(ProtocolError, match="JSON object"):
        _open(_raw(b"[1,2]"))


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
        with pytest.raises(ProtocolError) as e:
            _open(_raw(bad_head))
        assert e.value.reason == reason, bad_head[:10]


def test_reassembler_caps_partial_messages_and_bytes_per_sender():
    """One sender flooding chunks of many messages only evicts its own partial messages; another sender's
    partial message survives and completes."""
    r = protocol.Reassembler(per_sender_pending=2, per_sender_bytes=6000, max_pending=100)
    honest = protocol.split({"kind": "result", "agent": "b"}, b"h" * 3000, KEY, chunk_bytes=1000)
    r.add(*_open(honest[0]))
    for i in range(50):
        flood = protocol.split({"kind": "result", "agent": "a", "msg": f"m{i}"}, bytes(4000), KEY, chunk_bytes=1000)
        for m in flood[:3]:
            assert r.add(*_open(m)) is None
        count, held = r.pending_of("a")
        assert count <= 2 and held <= 6000
    assert r.evicted >= 48
    assert r.add(*_open(honest[1])) is None
    assert r.add(*_open(honest[2]))[1] == b"h" * 3000
