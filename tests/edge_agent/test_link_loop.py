"""One link loop drives many MQTT connections to a real Mosquitto; the shared worker runs agents' work in order."""

from __future__ import annotations

import threading
import time

from fedfleet.coordinator.broker import MosquittoBroker
from fedfleet.edge_agent.wire.link_loop import LinkLoop
from fedfleet.edge_agent.wire.mqtt import MqttLink
from fedfleet.edge_agent.worker import SharedWorker


def _wait(cond, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_twelve_hundred_links_on_one_thread_past_select_s_descriptor_ceiling():
    """paho's own loop cannot watch a descriptor numbered 1024 or above (a process held about 338 agents):
    1,200 links on one loop all connect, each gets its own message and the broadcast, with no thread each, and
    no more than `window` connects were ever in flight."""
    from fedfleet.tools.emulate.run import raise_nofile

    soft, _ = raise_nofile()  # before the broker starts, so it inherits the limit too
    assert soft >= 2600, f"the open-files limit {soft} is too low for 1,200 connections (raise the hard limit)"
    with MosquittoBroker() as mosquitto:
        _many_links(mosquitto)


def _many_links(mosquitto: MosquittoBroker) -> None:
    loop = LinkLoop(window=16)
    got: dict[str, list[str]] = {}
    lock = threading.Lock()

    def handler(i: int):
        def on_message(topic: str, payload: bytes) -> None:
            with lock:
                got.setdefault(f"c{i}", []).append(topic)
        return on_message

    n = 1200
    threads_before = threading.active_count()
    links = [MqttLink(mosquitto.url, client_id=f"loop-test-{i}", on_message=handler(i),
                      subscriptions=[f"looptest/one/{i}", "looptest/all"], loop=loop) for i in range(n)]
    peak = [0]
    for link in links:
        link.start(wait_s=0)
        peak[0] = max(peak[0], loop.in_flight)
    assert _wait(lambda: all(link.subscribed.is_set() for link in links), 120), loop.stats()
    assert max(link.client.socket().fileno() for link in links) >= 1024  # the descriptors select() cannot watch
    assert threading.active_count() - threads_before <= 1 + 4  # the loop and its connectors, not a thread a link
    assert loop.stats()["up"] == n and loop.connects == n and loop.failures == 0
    assert peak[0] <= 16
    links[0].publish("looptest/all", b"hello")
    for i in range(n):
        links[(i + 1) % n].publish(f"looptest/one/{i}", b"x")
    assert _wait(lambda: sum(len(v) for v in got.values()) == 2 * n, 60)
    assert all(sorted(got[f"c{i}"]) == sorted([f"looptest/one/{i}", "looptest/all"]) for i in range(n))
    for link in links:
        link.stop()
    assert loop.stats()["links"] == 0


def test_a_dropped_link_leaves_its_will_and_the_others_reconnect_after_a_broker_restart(tmp_path):
    broker = MosquittoBroker()
    port = broker.port
    loop = LinkLoop(window=4)
    seen: list[tuple[str, bytes]] = []
    watcher = MqttLink(broker.url, client_id="watcher", on_message=lambda t, p: seen.append((t, p)),
                       subscriptions=["wills/#", "back/#"], loop=loop, min_backoff_s=0.1, max_backoff_s=0.5)
    dying = MqttLink(broker.url, client_id="dying", on_message=lambda t, p: None, subscriptions=["x/dying"],
                     will=("wills/dying", b"gone", False), loop=loop)
    try:
        watcher.start(wait_s=10)
        dying.start(wait_s=10)
        dying.stop(graceful=False)  # no DISCONNECT: the broker publishes the will
        assert _wait(lambda: ("wills/dying", b"gone") in seen, 10)
        broker.stop()
        assert _wait(lambda: not watcher.connected.is_set(), 10)
        broker = MosquittoBroker(port=port)
        assert _wait(lambda: watcher.subscribed.is_set(), 20), loop.stats()
        assert watcher.connects == 2 and loop.failures >= 1
        sender = MqttLink(broker.url, client_id="sender", on_message=lambda t, p: None, subscriptions=[], loop=loop)
        sender.start(wait_s=10)
        sender.publish("back/again", b"1")
        assert _wait(lambda: ("back/again", b"1") in seen, 10)
        sender.stop()
        watcher.stop()
    finally:
        broker.stop()


def test_an_unreachable_broker_backs_off_and_stop_still_ends_the_link():
    from fedfleet.coordinator.broker import free_port

    loop = LinkLoop(window=2)
    link = MqttLink(f"mqtt://127.0.0.1:{free_port()}", client_id="nobody", on_message=lambda t, p: None,
                    subscriptions=["a"], loop=loop, min_backoff_s=0.05, max_backoff_s=0.2)
    link.start(wait_s=0)
    assert _wait(lambda: loop.failures >= 3, 10)
    assert not link.connected.is_set()
    link.stop()
    assert loop.stats()["links"] == 0 and loop.in_flight == 0


def test_the_shared_worker_runs_each_members_items_in_order_and_never_two_at_once():
    worker = SharedWorker(threads=3, idle_s=0.05)
    running: dict[int, int] = {}
    overlap: list[int] = []
    done: dict[int, list[int]] = {m: [] for m in range(5)}
    lock = threading.Lock()
    idle_calls = {m: 0 for m in range(5)}

    def handle_for(m: int):
        def handle(item: int) -> None:
            with lock:
                running[m] = running.get(m, 0) + 1
                if running[m] > 1:
                    overlap.append(m)
            time.sleep(0.001)
            with lock:
                running[m] -= 1
                done[m].append(item)
        return handle

    def idle_for(m: int):
        def idle() -> None:
            idle_calls[m] += 1
        return idle

    for m in range(5):
        worker.join(m, handle_for(m), idle_for(m), waiting=lambda m=m: m == 0)
    for i in range(100):
        for m in range(5):
            worker.put(m, i)
    assert _wait(lambda: all(len(v) == 100 for v in done.values()), 20)
    assert not overlap
    assert all(v == list(range(100)) for v in done.values())
    assert _wait(lambda: idle_calls[0] >= 2, 5)  # only the member that waits for something gets idle calls
    assert sum(idle_calls[m] for m in range(1, 5)) == 0
    worker.leave(0)
    worker.put(0, 1000)
    time.sleep(0.2)
    assert 1000 not in done[0]


def test_tls_links_publish_from_other_threads_while_the_loop_reads(tmp_path):
    """Over TLS a socket must never be written by one thread while another reads it: publishes from many
    threads only queue, the loop's thread does the I/O. 40 links each send 20 messages of 20 kB to the next
    one, all at once, and every message arrives whole."""
    from concurrent.futures import ThreadPoolExecutor

    from fedfleet.coordinator.tls import make_local_ca

    tls = make_local_ca(tmp_path / "tls")
    broker = MosquittoBroker(tls=tls)
    loop = LinkLoop(window=8)
    n, per = 40, 20
    got: dict[int, list[bytes]] = {i: [] for i in range(n)}
    try:
        links = [MqttLink(broker.url, client_id=f"tls-loop-{i}", on_message=lambda t, p, i=i: got[i].append(p),
                          subscriptions=[f"tlsloop/{i}"], ca_certs=str(tls.cafile), loop=loop) for i in range(n)]
        for link in links:
            link.start(wait_s=0)
        assert _wait(lambda: all(link.subscribed.is_set() for link in links), 60), loop.stats()
        payloads = {i: [bytes([i, k]) * 10_000 for k in range(per)] for i in range(n)}

        def send(i: int) -> None:
            for p in payloads[i]:
                links[i].publish(f"tlsloop/{(i + 1) % n}", p)

        with ThreadPoolExecutor(8) as ex:
            list(ex.map(send, range(n)))
        assert _wait(lambda: all(len(v) == per for v in got.values()), 60), {i: len(v) for i, v in got.items()}
        assert all(got[(i + 1) % n] == payloads[i] for i in range(n))  # whole, and in order
        sent, _ = links[0].wire_bytes()
        assert sent > per * 20_000  # the socket carried them (TLS records included)
        for link in links:
            link.stop()
    finally:
        broker.stop()


def test_the_shared_worker_grows_while_every_thread_waits_inside_work():
    """Emulated devices sleep out their slower compute inside their work: twenty members that each wait for
    all the others (a barrier of 20) finish only if the pool grew to 20 threads; it never passes max_threads."""
    worker = SharedWorker(threads=2, max_threads=20, idle_s=0.05)
    barrier = threading.Barrier(20, timeout=10)
    passed: list[int] = []
    for m in range(20):
        worker.join(m, lambda item, m=m: (barrier.wait(), passed.append(m)), lambda: None, lambda: False)
    for m in range(20):
        worker.put(m, 0)
    assert _wait(lambda: len(passed) == 20, 15)
    assert not barrier.broken
    assert len(worker._started) == 20


def test_socket_count_read_while_the_loop_writes_never_goes_back():
    """`wire_bytes()` read from another thread while the loop writes. Two ways a message went missing (a 385-byte
    shortfall in CI's books-against-socket test): paho takes a packet off its queue before it writes it, and the
    kernel may hold a written burst back (TCP small queues) before it counts it as sent. Read in a tight loop
    during 600 publishes, the sent count never decreases, and once all is written it equals the kernel's."""
    with MosquittoBroker() as mosquitto:
        loop = LinkLoop(window=4)
        link = MqttLink(mosquitto.url, client_id="wire-race", on_message=lambda t, p: None,
                        subscriptions=["wirerace/in"], loop=loop)
        link.start(wait_s=0)
        assert _wait(lambda: link.subscribed.is_set())
        done = threading.Event()

        def publish() -> None:
            for k in range(600):
                link.publish("wirerace/out", bytes(300 + k % 7))
            done.set()

        seen: list[int] = []
        t = threading.Thread(target=publish)
        t.start()
        deadline = time.monotonic() + 60
        while (not done.is_set() or link._client._out_messages) and time.monotonic() < deadline:
            seen.append(link.wire_bytes()[0])
        t.join()
        drops = [(a, b) for a, b in zip(seen, seen[1:]) if b < a]
        assert len(seen) > 100 and not drops, (len(seen), drops[:5], link.connects)
        assert not link._client._out_messages  # every message acknowledged
        assert _wait(lambda: not link._client._out_packet)
        sent = link.wire_bytes()[0]
        assert sent == link.wire.totals()[0] >= 600 * 300, sent
        link.stop()


def test_a_link_without_a_loop_reads_and_writes_its_tls_socket_on_one_thread(tmp_path):
    """An OpenSSL connection must never be read and written from two threads at once: `fedfleet serve` over TLS
    aborted in CI with a corrupted heap when its link (no loop given) wrote a publish on the caller's thread while
    its network thread read, and closed the socket on the caller's thread at stop. Every socket read, write and
    close of such a link, publishing from three threads and stopping from a fourth, happens on one thread that
    is none of them; every message arrives, and the thread is gone after `stop`."""
    from fedfleet.coordinator.tls import make_local_ca

    tls = make_local_ca(tmp_path / "tls")
    broker = MosquittoBroker(tls=tls)
    got: list[bytes] = []
    try:
        link = MqttLink(broker.url, client_id="one-thread", on_message=lambda t, p: got.append(p),
                        subscriptions=["onethread/echo"], ca_certs=str(tls.cafile))
        io_threads: set[int] = set()
        client = link.client
        for name in ("loop_read", "loop_write", "_sock_close"):
            original = getattr(client, name)

            def traced(*a, _original=original, **kw):
                if client._sock is not None:  # (the connector thread's connect closes a socket that is not there)
                    io_threads.add(threading.get_ident())
                return _original(*a, **kw)
            setattr(client, name, traced)
        link.start(wait_s=20)
        publishers = [threading.Thread(target=lambda j=j: [link.publish("onethread/echo", bytes([j, k]) * 4000)
                                                           for k in range(30)]) for j in range(3)]
        for t in publishers:
            t.start()
        for t in publishers:
            t.join()
        assert _wait(lambda: len(got) == 90), len(got)
        stopper = threading.Thread(target=link.stop)
        stopper.start()
        stopper.join()
        callers = {t.ident for t in (*publishers, stopper)} | {threading.get_ident()}
        assert len(io_threads) == 1 and not io_threads & callers, (io_threads, callers)
        assert not any(t.name == "mqtt-one-thread" and t.is_alive() for t in threading.enumerate())
    finally:
        broker.stop()
