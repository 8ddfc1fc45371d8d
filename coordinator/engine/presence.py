"""Who is online: the agents' latest statuses (fresh, authenticated and schema-checked by the receive path), which
of them hold the current model package, and waiting for enough of them (re-publishing the package to agents
that lack it). Written on the network thread (`on_status`), read on the engine thread; one lock guards it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)


class Presence:
    def __init__(self, roster: Iterable[str]) -> None:
        self.roster = sorted(roster)
        self.online: dict[str, dict[str, Any]] = {}  # agent -> its latest status
        self._lock = threading.Lock()

    def on_status(self, agent: str, status: dict[str, Any]) -> None:
        """A fresh, authenticated, schema-checked status (from the receive path)."""
        with self._lock:
            self.online[agent] = status

    def ready_agents(self, digest: str) -> list[str]:
        """Agents online that have loaded the model package whose digest is `digest`."""
        with self._lock:
            return sorted(a for a, s in self.online.items() if s.get("state") == "online" and s.get("model") == digest)

    def announced(self, agents: Iterable[str]) -> dict[str, int]:
        """The sample counts `agents` announced in their statuses (positive integers only), as of now."""
        with self._lock:
            counts = {a: self.online.get(a, {}).get("samples") for a in agents}
        return {a: v for a, v in counts.items() if type(v) is int and v > 0}

    def waiting_line(self, digest: str, n: int) -> str:
        """`1/2 ready; pi-07 ready; pi-08 online, no model, error: bad_signature: ...; pi-09 not seen`: each
        roster agent's state as its latest status tells it, with the error it reports."""
        with self._lock:
            statuses = dict(self.online)
        parts, ready = [], 0
        for agent in self.roster:
            s = statuses.get(agent)
            if s is None:
                parts.append(f"{agent} not seen")
                continue
            state = str(s.get("state"))[:16]
            if state == "online" and s.get("model") == digest:
                text, ready = f"{agent} ready", ready + 1
            else:
                model = s.get("model")
                text = f"{agent} {state}, " + ("no model" if not model else f"model {str(model)[:12]} (not current)")
            if s.get("error"):
                text += f", error: {str(s.get('error'))[:160]}"
            parts.append(text)
        return f"{ready}/{n} ready; " + "; ".join(parts)

    def wait_for_agents(self, n: int, timeout_s: float, *, digest: Callable[[], str], publish: Callable[[], Any],
                        republish_s: float = 15.0, settle_s: float = 2.0,
                        report: Callable[[str], Any] | None = None) -> list[str]:
        """Wait until n agents are online with the current model package (`digest()`); `publish()` sends it again.

        An agent online without the package, that has reported no error about it (a chunk was refused as
        damaged), gets the package again, live, without relying on the retained copy: a clustered broker
        (RabbitMQ) keeps retained messages on the node that received them, so agents on other nodes never
        see it. The package goes out again once agents that came online since the last publication have
        stopped arriving for `settle_s` and still lack it (one publication per wave of joins, so round 1
        starts within seconds of the agents being online), and at most once per `republish_s` for agents
        that still lack it after that (a lost delivery). Agents that already hold it ignore the copy.
        `report(line)`: called with a one-line picture of the roster (`waiting_line`) whenever it changes.
        """
        start = time.monotonic()
        deadline, last_publish = start + timeout_s, start
        covered: set[str] = set()  # agents online at the last publication that went out while waiting
        newcomers: set[str] = set()
        changed = start
        last_line = None
        while time.monotonic() < deadline:
            current = digest()
            ready = self.ready_agents(current)
            if report is not None:
                line = self.waiting_line(current, n)
                if line != last_line:
                    report(line)
                    last_line = line
            if len(ready) >= n:
                return ready
            with self._lock:
                missing = {a for a, s in self.online.items()  # an agent that refused it says why
                           if s.get("state") == "online" and s.get("model") != current and not s.get("error")}
            now = time.monotonic()
            if missing - covered != newcomers:
                newcomers, changed = missing - covered, now
            wave_over = bool(newcomers) and now - changed >= settle_s
            if missing and (wave_over or now - last_publish >= republish_s):
                log.warning("%d agents online without the model package (%s); publishing it again",
                            len(missing), ", ".join(sorted(missing)[:5]))
                publish()
                with self._lock:
                    covered = {a for a, s in self.online.items() if s.get("state") == "online"}
                newcomers, last_publish = set(), time.monotonic()
            time.sleep(0.05)
        current = digest()
        ready = self.ready_agents(current)
        with self._lock:
            errors = {a: s.get("error") for a, s in self.online.items() if s.get("error")}
            seen = {a: f"{s.get('state')}, model {'current' if s.get('model') == current else s.get('model')}"
                    for a, s in self.online.items() if a not in ready}
        unseen = sorted(set(self.roster) - set(ready) - set(seen))
        raise TimeoutError(
            f"only {len(ready)} of {n} agents are online with the model after {timeout_s:.0f} s"
            + (f"; agent errors: {errors}" if errors else "")
            + (f"; not ready: {dict(list(seen.items())[:10])}" if seen else "")
            + (f"; never seen: {unseen[:10]}" if unseen else "")
        )
