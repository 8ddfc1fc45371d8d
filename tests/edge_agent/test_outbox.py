"""The agent's store-and-forward outbox (edge_agent/outbox.py): kept on disk before publishing, forwarded on
another connection, settled by a later task, bounded, and robust to a damaged file."""

from __future__ import annotations

from fedfleet.edge_agent.outbox import Outbox


class FakeLink:
    """Records what is published (the outbox only calls `publish`)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        self.sent.append((topic, payload))
        return len(payload)


def test_kept_on_disk_and_forwarded_after_a_restart(tmp_path):
    first = FakeLink()
    box = Outbox(tmp_path)
    box.put(("run-1", 3, 0), "t/result", [b"chunk-a", b"chunk-b"], first)
    assert box.forward(first) == 0  # published on this connection already: paho resends it if needed
    again = Outbox(tmp_path)  # the agent restarted
    assert again.keys() == [("run-1", 3, 0)]
    link = FakeLink()
    assert again.forward(link) == 2 and link.sent == [("t/result", b"chunk-a"), ("t/result", b"chunk-b")]
    assert again.forward(link) == 0  # once per connection
    assert again.forward(link, every=True) == 2  # after a reconnection of the same link: once more


def test_a_new_connection_gets_the_results_of_the_lost_one(tmp_path):
    old, new = FakeLink(), FakeLink()
    box = Outbox(None)  # no state directory: kept in memory
    box.put(("r", 1, 0), "t", [b"x"], old)
    assert box.forward(new) == 1 and new.sent == [("t", b"x")]


def test_settled_by_a_later_task_or_another_run_and_bounded(tmp_path):
    box = Outbox(tmp_path, max_entries=3)
    link = FakeLink()
    for n in range(1, 5):
        box.put(("r", n, 0), "t", [bytes([n])], link)
    assert box.keys() == [("r", 2, 0), ("r", 3, 0), ("r", 4, 0)]  # the oldest went past max_entries
    box.settle("r", 4, 0)
    assert box.keys() == [("r", 4, 0)]  # earlier tasks of the run are done; the task itself is not
    box.settle("other-run", 1, 0)
    assert box.keys() == [] and not list((tmp_path / "outbox").glob("*.bin"))


def test_a_damaged_entry_is_dropped_not_fatal(tmp_path):
    box = Outbox(tmp_path)
    box.put(("r", 1, 0), "t", [b"abc"], None)
    path = next((tmp_path / "outbox").glob("*.bin"))
    path.write_bytes(path.read_bytes()[:-2])  # torn
    assert Outbox(tmp_path).keys() == []
    assert not path.exists()
