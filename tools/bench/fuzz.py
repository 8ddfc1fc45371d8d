"""`fedfleet bench fuzz`: mutated messages against a live coordinator and live agents over Mosquitto.

    fedfleet bench fuzz [--n 100000] [--agents 3] [--seed 0] [--json PATH]

A real coordinator runs FedAvg rounds back to back with `--agents` honest in-process agents and one insider
on the roster. The first half of the cases are keyless mutants (random bytes, damaged or forged envelopes,
old-format envelopes) published by an outsider on every uplink topic of the fleet, on unknown ids and on the
agents' task and model topics. The second half are mutants re-signed with the insider's real device key:
headers with fields replaced by hostile values (huge or deep or non-finite numbers, wrong types, foreign
codecs, other rounds), damaged payloads, stale status and telemetry. Once per round the insider also sends
one structurally valid update scaled by up to 1e38.

Prints exactly {"cases", "crashes", "untyped_errors", "rss_growth_mb", "rounds_completed", "accepted_bad"}:
- crashes: the round engine or a network thread died (an exception out of a round, or a dead thread);
- untyped_errors: error records from the receive path's last line of defence or the MQTT handler guard,
  plus exceptions out of a round;
- accepted_bad: insider-half rounds whose model change exceeds `norm_bound` times the median change of the
  keyless-half rounds, or that leave the model non-finite (a re-signed mutant that moved the model beyond
  the norm bound), plus accepted insider updates of 1e36 or 1e4 per entry (norms beyond any bound a
  running median of honest updates gives). Random mutations can yield valid results (a renamed message id, say): those are accepted
  like any result, and counted in the details as `insider_ok_rows`;
- rss_growth_mb: resident memory growth of this process from after the warm-up round to the end.
Details (per half: rounds, genuine results per round, refusal reasons, throughput) go to stderr.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import queue
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.edge_agent.errors import ProtocolError
from fedfleet.tools.bench.output import emit, progress

KEYS = ("cases", "crashes", "untyped_errors", "rss_growth_mb", "rounds_completed", "accepted_bad")
VALID_TAG = 777_000  # claimed samples of the insider's structurally valid update (+ scale index)


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class _ErrorCount(logging.Handler):
    """Counts error records from the guards that catch what no typed check caught."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0
        self.samples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "receive path bug" in msg or "message handler failed" in msg:
            self.count += 1
            if len(self.samples) < 5:
                self.samples.append(msg[:300] + (f" {record.exc_info[1]!r}"[:300] if record.exc_info else ""))


# ---------------------------------------------------------------- mutants
def hostile_value(rng: np.random.Generator) -> Any:
    choices = [
        lambda: 2**70, lambda: -(2**63) - 1, lambda: 2**31, lambda: -1, lambda: 0, lambda: True, lambda: None,
        lambda: 1e308, lambda: -1e-320, lambda: "x" * int(rng.integers(0, 300)), lambda: "fast", lambda: [],
        lambda: [1, 2, 3], lambda: {}, lambda: {"a": {"b": {"c": [1]}}}, lambda: [[[[[[[[[[1]]]]]]]]]],
        lambda: float(rng.normal()), lambda: int(rng.integers(-10, 10)), lambda: {"name": "fedzip", "z": 7},
        lambda: {"name": "fedzip", "z": 0.05, "bogus": 1}, lambda: {"name": "zstd", "level": 99},
        lambda: [["fc0.weight", [2**40, 2**40]]], lambda: [0, 1], lambda: [5, 2], lambda: "0" * 64,
    ]
    return choices[int(rng.integers(len(choices)))]()


RAW_HEADERS = [
    b'{"a":' * 700 + b"1" + b"}" * 700, b"[" * 5000 + b"]" * 5000, b'{"round": 1' + b"0" * 5000 + b"}",
    b'{"learn_s": 1e999}', b'{"meta": {"metrics": {"loss": NaN}}}', b'{"x": Infinity}', b"\xff\xfe\x00",
    b"\x78\x9c garbage", b"[1, 2]", b"{}", b'"just a string"',
]
FIELDS = ("kind", "fleet", "agent", "run", "round", "phase", "method", "codec", "layout", "chunk", "msg", "digest",
          "total", "sent", "meta", "seq")
META_FIELDS = ("samples", "learn_s", "metrics", "profile")


class Fuzzer:
    def __init__(self, url: str, fleet: str, roster: list[str], insider: str, insider_key: bytes, seed: int) -> None:
        from fedfleet.edge_agent.wire import protocol
        from fedfleet.edge_agent.wire.mqtt import MqttLink

        self.p = protocol
        self.fleet, self.roster, self.insider, self.key = fleet, roster, insider, insider_key
        self.rng = np.random.default_rng(seed)
        self.tasks: queue.Queue[tuple[dict[str, Any], bytes]] = queue.Queue()
        self.task: dict[str, Any] | None = None
        self.valid_sent: dict[int, int] = {}  # round -> scale index of the valid update sent
        self.coordinator_key = b""  # the coordinator's public key, to read the insider's tasks
        self.link = MqttLink(url, client_id=f"fuzz-{os.getpid()}", on_message=self._on, clean_session=True,
                             subscriptions=[protocol.agent_topic(fleet, insider, "task")])
        self.link.start()

    def _on(self, topic: str, payload: bytes) -> None:
        if payload:
            self.tasks.put((topic, payload))

    def publish(self, topic: str, payload: bytes) -> None:
        self.link.publish(topic, payload, qos=0)

    # ---------------------------------------------------------------- keyless
    def keyless(self) -> tuple[str, bytes]:
        p, rng = self.p, self.rng
        who = self.roster[int(rng.integers(len(self.roster)))] if rng.random() < 0.8 else f"ghost-{rng.integers(1e6)}"
        kind = ("result", "status", "telemetry", "task")[int(rng.integers(4))]
        topic = p.agent_topic(self.fleet, who, kind)
        if rng.random() < 0.05:
            topic = p.broadcast_topic(self.fleet, f"model/{int(rng.integers(3, 8))}")
        r = rng.random()
        if r < 0.3:
            data = rng.bytes(int(rng.integers(0, 2000)))
        elif r < 0.6:  # a well-formed envelope under a guessed key, then damaged
            header = {"kind": kind, "fleet": self.fleet, "agent": who, "round": int(rng.integers(0, 50)),
                      "meta": {"samples": 10}, "seq": [1, int(rng.integers(1e6))]}
            data = bytearray(p.seal(header, rng.bytes(int(rng.integers(0, 500))), rng.bytes(32)))
            for _ in range(int(rng.integers(0, 4))):
                data[int(rng.integers(len(data)))] ^= int(rng.integers(1, 256))
            data = bytes(data[: int(rng.integers(1, len(data) + 1))]) if rng.random() < 0.3 else bytes(data)
        elif r < 0.8:  # an old (v1) or foreign-auth frame, or a raw hostile header with a garbage tag
            head = RAW_HEADERS[int(rng.integers(len(RAW_HEADERS)))]
            version, auth = (1, 1) if rng.random() < 0.5 else (2, int(rng.integers(0, 4)))
            body = b"FFLT" + bytes([version, auth]) + len(head).to_bytes(4, "big") + head + (0).to_bytes(4, "big")
            data = body + rng.bytes(int(rng.choice([32, 64])))
        else:
            data = b"FFLT" + rng.bytes(int(rng.integers(0, 100)))
        return topic, data

    # ---------------------------------------------------------------- insider
    def _latest_task(self) -> dict[str, Any] | None:
        while True:
            try:
                _, payload = self.tasks.get_nowait()
            except queue.Empty:
                return self.task
            try:
                self.task = self.p.open_signed(payload, self.coordinator_key)[0]
            except ProtocolError:
                continue

    def valid_update(self, task: dict[str, Any]) -> list[bytes]:
        from fedfleet.edge_agent.wire import codecs

        k = int(self.rng.integers(0, 5))
        scale = (1e38, 1e6, 1e3, 10.0, 1.0)[k]
        layout = codecs.normalize_layout(task["meta"]["expect"])
        tensors = {n: (self.rng.normal(size=s) * scale * 1e-2).astype(np.float32) for n, s in layout}
        self.valid_sent[int(task["round"])] = k
        return self.p.split(self._header(task, samples=VALID_TAG + k), codecs.encode(tensors, layout, task["meta"]["uplink"]),
                            self.key)

    def _header(self, task: dict[str, Any], samples: int) -> dict[str, Any]:
        meta = task["meta"]
        return {"kind": "result", "fleet": self.fleet, "agent": self.insider, "run": task["run"],
                "round": task["round"], "phase": task["phase"], "method": task["method"], "codec": meta["uplink"],
                "layout": meta["expect"], "meta": {"samples": samples, "learn_s": 0.1, "metrics": {"loss": 0.3}}}

    def insider_case(self) -> list[tuple[str, bytes]]:
        from fedfleet.edge_agent.wire import codecs

        p, rng = self.p, self.rng
        task = self._latest_task()
        kind = ("result", "result", "result", "status", "telemetry")[int(rng.integers(5))]
        topic = p.agent_topic(self.fleet, self.insider, kind)
        out: list[tuple[str, bytes]] = []
        if task is not None and kind == "result" and int(task["round"]) not in self.valid_sent and rng.random() < 0.02:
            out += [(topic, m) for m in self.valid_update(task)]
        if kind == "result" and task is not None:
            header = self._header(task, samples=int(rng.integers(1, 1000)))
            layout = codecs.normalize_layout(task["meta"]["expect"])
            payload = codecs.encode({n: np.zeros(s, np.float32) for n, s in layout}, layout, task["meta"]["uplink"])
        else:
            header = {"kind": kind, "fleet": self.fleet, "agent": self.insider, "seq": [1, int(rng.integers(0, 3))]}
            payload = json.dumps({"state": "online", "event": "energy", "run": "x", "round": 1, "compute_j": 1.0,
                                  "radio_j": 0.0, "idle_j": 0.0, "samples": 2**31}).encode()
        for _ in range(int(rng.integers(1, 4))):
            r = rng.random()
            if r < 0.55:
                header[FIELDS[int(rng.integers(len(FIELDS)))]] = hostile_value(rng)
            elif r < 0.8 and isinstance(header.get("meta"), dict):
                header["meta"] = {**header["meta"], META_FIELDS[int(rng.integers(len(META_FIELDS)))]: hostile_value(rng)}
            elif r < 0.9:
                payload = rng.bytes(int(rng.integers(0, len(payload) + 10)))
            else:
                payload = (np.full(len(payload) // 4, rng.choice([np.nan, np.inf, 3e38]), "<f4")).tobytes()
        if rng.random() < 0.1:  # a raw hostile header under the real key
            head = RAW_HEADERS[int(rng.integers(len(RAW_HEADERS)))]
            body = p._PREFIX.pack(p.MAGIC, p.VERSION, p.AUTH_HMAC, len(head)) + head + p._LEN.pack(len(payload)) + payload
            out.append((topic, body + hmac.new(self.key, body, hashlib.sha256).digest()))
            return out
        try:
            text = json.dumps(header, allow_nan=True).encode()
        except (TypeError, ValueError):
            return out
        if len(text) > p.MAX_HEADER_BYTES:
            text = text[: p.MAX_HEADER_BYTES]
        body = p._PREFIX.pack(p.MAGIC, p.VERSION, p.AUTH_HMAC, len(text)) + text + p._LEN.pack(len(payload)) + payload
        out.append((topic, body + hmac.new(self.key, body, hashlib.sha256).digest()))
        return out


# ---------------------------------------------------------------- the run
def run(n: int, agents: int, seed: int, per_round_s: float) -> dict[str, Any]:
    from fedfleet.coordinator.broker import MosquittoBroker
    from fedfleet.coordinator.job.assemble import agent_ids, build_run
    from fedfleet.coordinator.job.config import JobConfig
    from fedfleet.coordinator.job.run import small_model_threads
    from fedfleet.coordinator.records.ledger import LedgerView
    from fedfleet.edge_agent.agent import Agent, AgentConfig
    from fedfleet.edge_agent.wire import protocol, signing

    small_model_threads()
    errors = _ErrorCount()
    logging.getLogger().addHandler(errors)
    logging.getLogger().setLevel(logging.ERROR)
    cfg = JobConfig(agents=agents, rounds=1, alpha=0.0, mode="full", deadline_s=per_round_s, quorum=1.0,
                    grace_s=0.0, fleet=f"fuzz{os.getpid()}", uplink={"name": "none"})
    honest = agent_ids(cfg)
    insider = "insider"
    secret, seed_key = os.urandom(32), signing.new_signing_seed()
    out: dict[str, Any] = {"cases": 0, "crashes": 0, "untyped_errors": 0}
    with MosquittoBroker() as b, tempfile.TemporaryDirectory() as tmp:
        run = build_run(cfg, broker_url=b.url, secret=secret, signing_key=seed_key, run_dir=Path(tmp),
                        roster=[*honest, insider], run_id="fuzz")
        coord, local = run.coordinator, run.shards()
        processed = [0]
        inner = coord.link._on_message_cb

        def counting(topic: str, payload: bytes) -> None:
            processed[0] += 1
            inner(topic, payload)

        coord.link._on_message_cb = counting
        coord.start()
        pub = signing.public_key(seed_key)
        clients = [Agent(AgentConfig(b.url, cfg.fleet, a, protocol.derive_key(secret, a), coordinator_key=pub), d)
                   for a, d in zip(honest, local)]
        for a in clients:
            a.start()
        fuzz = Fuzzer(b.url, cfg.fleet, [*honest, insider], insider, protocol.derive_key(secret, insider), seed)
        fuzz.coordinator_key = pub
        # the insider announces itself so it is selected (its results are all the fuzzer's)
        fuzz.link.publish(protocol.agent_topic(cfg.fleet, insider, "status"), protocol.seal(
            {"kind": "status", "agent": insider, "seq": [2, 1]},
            json.dumps({"state": "online", "model": coord.package_digest, "samples": len(local[0])}).encode(),
            fuzz.key), retain=True)
        coord.wait_for_agents(agents + 1, 120)
        summaries: list[Any] = []
        stop = threading.Event()
        phase = {"name": "warmup"}
        states: list[tuple[str, Any, Any]] = []

        def rounds() -> None:
            r = 0
            while not stop.is_set():
                r += 1
                before = {k: v.clone() for k, v in coord.strategy.global_state().items()}
                try:
                    s = coord.run_round(r)
                except Exception as exc:  # noqa: BLE001 - counted: a crash of the round engine
                    out["crashes"] += 1
                    out["untyped_errors"] += 1
                    logging.getLogger("bench.fuzz").error("round %d raised %r", r, exc)
                    continue
                summaries.append((phase["name"], s))
                states.append((phase["name"], before, {k: v.clone() for k, v in coord.strategy.global_state().items()}))

        engine = threading.Thread(target=rounds, daemon=True)
        engine.start()
        t_wait = time.time() + 60
        while not summaries and time.time() < t_wait:
            time.sleep(0.05)
        rss0 = rss_mb()
        halves = {"keyless": n // 2, "insider": n - n // 2}
        timing: dict[str, float] = {}
        for name, count in halves.items():
            progress("fuzz", f"{count} mutated messages, {name} half")
            phase["name"] = name
            t0 = time.perf_counter()
            sent = 0
            while sent < count:
                batch = []
                for _ in range(min(200, count - sent)):
                    batch += [fuzz.keyless()] if name == "keyless" else fuzz.insider_case()
                    sent += 1
                target = processed[0] + sum(1 for t, _ in batch if "/agents/" in t and not t.endswith("/task"))
                for topic, data in batch:
                    fuzz.publish(topic, data)
                deadline = time.time() + 10
                while processed[0] < target - 5 and time.time() < deadline:  # keep pace with the receiver
                    time.sleep(0.005)
            timing[name] = time.perf_counter() - t0
            out["cases"] += count
            time.sleep(per_round_s + 1)  # let the round in flight finish under this half's name
        stop.set()
        engine.join(3 * per_round_s + 30)
        if engine.is_alive() or not coord.link.alive():
            out["crashes"] += 1
        rss1 = rss_mb()
        with LedgerView(Path(tmp) / "ledger.sqlite") as view:
            ledger_rows = view.agent_rows("fuzz")
        for a in clients:
            a.stop()
        fuzz.link.stop()
        coord.stop()
    out["untyped_errors"] += errors.count
    out["rss_growth_mb"] = round(rss1 - rss0, 1)
    by_half: dict[str, list[Any]] = {"warmup": [], "keyless": [], "insider": []}
    for name, s in summaries:
        by_half[name].append(s)
    out["rounds_completed"] = len(by_half["keyless"]) + len(by_half["insider"])
    # accepted_bad: insider ok rows of structurally invalid mutants, and insider-half rounds that moved the
    # model beyond norm_bound x the median keyless-half change (or left it non-finite)
    import torch

    def change(a: Any, b: Any) -> float:
        return float(torch.sqrt(sum(((b[k] - a[k]).double() ** 2).sum() for k in a)))

    key_changes = [change(a, b) for name, a, b in states if name == "keyless"]
    ref = float(np.median(key_changes)) if key_changes else float("nan")
    bad_rounds = [i for i, (name, a, b) in enumerate(states) if name == "insider" and (
        not all(bool(torch.isfinite(v).all()) for v in b.values()) or change(a, b) > coord.cfg.norm_bound * ref)]
    insider_ok = [dict(r) for r in ledger_rows if r["agent"] == insider and r["status"] == "ok"]
    scaled_ok = [r for r in insider_ok if f"claimed {VALID_TAG}" in (r["detail"] or "")]
    huge_ok = [r for r in scaled_ok if any(f"claimed {VALID_TAG + k} " in (r["detail"] or "") for k in (0, 1))]
    out["accepted_bad"] = len(bad_rounds) + len(huge_ok)
    reasons = Counter(r["status"] for r in ledger_rows if r["status"] != "ok")
    genuine = {h: [s.ok for s in by_half[h]] for h in ("keyless", "insider")}
    out.update({
        "n": n, "agents": agents, "processed_by_coordinator": processed[0], "seconds": timing,
        "cases_per_s": {k: round(halves[k] / v, 1) for k, v in timing.items() if v > 0},
        "rounds_per_half": {h: len(v) for h, v in by_half.items()},
        "keyless_rounds_with_all_genuine_results": sum(1 for s in by_half["keyless"] if s.ok >= agents),
        "genuine_ok_per_round": genuine, "accuracy_last": summaries[-1][1].accuracy if summaries else None,
        "insider_ok_rows": len(insider_ok), "insider_valid_updates_sent": len(fuzz.valid_sent),
        "insider_scaled_updates_accepted": [r["detail"] for r in scaled_ok][:20],
        "keyless_median_model_change": ref, "insider_rounds_beyond_bound": len(bad_rounds),
        "ledger_rows": len(ledger_rows), "ledger_reasons": dict(reasons.most_common(25)),
        "error_samples": errors.samples,
    })
    return out


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="fedfleet bench fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None,
                   help="mutated messages in all (half keyless, half insider; default 100000); with --methods, "
                        "hostile payloads in all (default 54000)")
    p.add_argument("--agents", type=int, default=3, help="honest agents")
    p.add_argument("--seed", type=int, default=0, help="seed of the mutations (default %(default)s)")
    p.add_argument("--round-deadline", type=float, default=5.0, dest="per_round_s", help="seconds each round waits for agents (default %(default)s)")
    p.add_argument("--json", help="also write the result JSON to this file")
    p.add_argument("--methods", help="'all' or a comma list: a hostile corpus per method, in-process "
                                     "(tools/bench/fuzz_methods.py)")
    args = p.parse_args(argv)
    if args.methods:
        from fedfleet.tools.bench import fuzz_methods

        chosen = list(fuzz_methods.METHODS) if args.methods == "all" else args.methods.split(",")
        unknown = sorted(set(chosen) - set(fuzz_methods.METHODS))
        if unknown:
            p.error(f"--methods: unknown {unknown}; choose from {', '.join(fuzz_methods.METHODS)} or 'all'")
        emit(fuzz_methods.run(54_000 if args.n is None else args.n, args.seed, chosen), fuzz_methods.KEYS, args.json)
        return 0
    emit(run(100_000 if args.n is None else args.n, args.agents, args.seed, args.per_round_s), KEYS, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
