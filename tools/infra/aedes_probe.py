"""Two upstream behaviours of aedes 1.2.0 with aedes-persistence-redis 11.2.2 that fedfleet's clients meet,
measured on a fresh two-node cluster (tools/infra/aedes.py) with plain paho clients.

    python -m fedfleet.tools.infra.aedes_probe [--sessions 3] [--trials 3] [--json PATH]

1. `subscribe`: one client per row subscribes to 1, 2 or 3 topic filters, in one SUBSCRIBE packet or one
   packet per filter, with a clean or a persistent session; the row counts the SUBACKs received within
   `--wait` seconds. Measured: a persistent session never gets the SUBACK of a SUBSCRIBE with two or more
   filters (a later one-filter SUBSCRIBE on the same connection is acknowledged, the stuck one never is);
   one filter per SUBSCRIBE, and clean sessions, are fine.
2. `burst`: `--sessions` persistent sessions on node 1, each subscribed (one filter per SUBSCRIBE) to its own
   task topic and to one shared broadcast topic; a clean publisher on node 0 sends one QoS 1 broadcast, then
   (after `gap_s`) one QoS 1 task per session: fedfleet's state-then-tasks pattern. Counts the sessions that
   got the broadcast and their task live, then reconnects them and counts what was still queued for them.

Prints one JSON object (also to `--json`); exits 0 whatever it measured (a probe, not a check).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from fedfleet.edge_agent.cli_run import ArgParser


class _Client:
    def __init__(self, url: str, client_id: str, clean: bool) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.topics: list[str] = []
        self.subacks = 0
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                             protocol=paho.MQTTv311)
        self.c.on_connect = lambda *a: self.connected.set()
        self.c.on_message = self._message
        self.c.on_subscribe = self._suback
        self.c.connect(host, int(port), keepalive=30)
        self.c.loop_start()
        if not self.connected.wait(10):
            raise ConnectionError(f"{client_id} could not connect to {url}")

    def _message(self, client, userdata, msg) -> None:  # noqa: ANN001
        with self.lock:
            self.topics.append(msg.topic)

    def _suback(self, client, userdata, mid, codes, props) -> None:  # noqa: ANN001
        with self.lock:
            self.subacks += 1

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _wait(cond: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def probe_subscribe(url: str, wait_s: float = 3.0) -> list[dict[str, Any]]:
    rows = []
    tag = os.urandom(3).hex()
    for clean in (True, False):
        for filters, per_packet in ((1, False), (2, False), (3, False), (3, True)):
            topics = [f"probe/{tag}/k{i}" for i in range(filters)]
            c = _Client(url, f"probe-sub-{tag}-{int(clean)}{filters}{int(per_packet)}", clean)
            try:
                if per_packet:
                    for t in topics:
                        c.c.subscribe(t, 1)
                else:
                    c.c.subscribe([(t, 1) for t in topics])
                packets = filters if per_packet else 1
                _wait(lambda c=c, packets=packets: c.subacks >= packets, wait_s)
                rows.append({"clean_session": clean, "filters": filters, "subscribe_packets": packets,
                             "subacks": c.subacks, "acknowledged": c.subacks == packets})
            finally:
                c.close()
                if not clean:
                    _Client(url, c.c._client_id.decode(), True).close()  # drop the persistent session
    return rows


def probe_burst(pub_url: str, sub_url: str, sessions: int, gap_s: float, settle_s: float = 2.0) -> dict[str, Any]:
    tag = os.urandom(3).hex()
    ids = [f"probe-burst-{tag}-{i}" for i in range(sessions)]
    broadcast = f"probe/{tag}/broadcast/state"
    subs = [_Client(sub_url, cid, False) for cid in ids]
    for i, s in enumerate(subs):
        for t in (f"probe/{tag}/agents/{i}/task", broadcast):
            s.c.subscribe(t, 1)
    _wait(lambda: all(s.subacks >= 2 for s in subs), 10.0)
    pub = _Client(pub_url, f"probe-pub-{tag}", True)
    pub.c.publish(broadcast, os.urandom(9000), qos=1).wait_for_publish(10)
    if gap_s:
        time.sleep(gap_s)
    for i in range(sessions):
        pub.c.publish(f"probe/{tag}/agents/{i}/task", b"task", qos=1)
    time.sleep(settle_s)
    live_b = sum(broadcast in s.topics for s in subs)
    live_t = sum(any(t.endswith("/task") for t in s.topics) for s in subs)
    for s in subs:
        s.close()
    pub.close()
    again = [_Client(sub_url, cid, False) for cid in ids]
    time.sleep(settle_s)
    queued_b = sum(broadcast in s.topics for s in again)
    for s in again:
        s.close()
        _Client(sub_url, s.c._client_id.decode(), True).close()
    return {"sessions": sessions, "gap_s": gap_s, "broadcast_live": live_b, "task_live": live_t,
            "broadcast_after_reconnect": queued_b}


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="python -m fedfleet.tools.infra.aedes_probe", description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=3, help="persistent sessions in the burst probe (default %(default)s)")
    p.add_argument("--trials", type=int, default=3, help="burst trials per gap (default %(default)s)")
    p.add_argument("--wait", type=float, default=3.0, help="seconds to wait for a SUBACK (default %(default)s)")
    p.add_argument("--json", help="also write the JSON to this file")
    args = p.parse_args(argv)
    if args.sessions < 1 or args.trials < 1 or args.wait <= 0:
        p.error("--sessions and --trials must be at least 1 and --wait positive")
    from fedfleet.tools.infra.aedes import PINNED, AedesCluster

    with AedesCluster(2) as cluster:
        out = {"versions": PINNED, "subscribe": probe_subscribe(cluster.urls[1], args.wait),
               "burst": [probe_burst(cluster.urls[0], cluster.urls[1], args.sessions, gap)
                         for gap in (0.0, 0.5) for _ in range(args.trials)]}
    text = json.dumps(out, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
