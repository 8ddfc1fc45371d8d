"""A byte-counting TCP proxy: an independent count of what each MQTT client's connection carried.

`ByteProxy(upstream_port)` listens on a free 127.0.0.1 port and relays every connection to the broker,
counting the bytes each way per connection. A connection is named by the client id in its first packet (the
MQTT 3.1.1 CONNECT, parsed here from the raw bytes), so `by_client()` sums reconnections of one client.
"""

from __future__ import annotations

import selectors
import socket
import threading
from dataclasses import dataclass


@dataclass
class Conn:
    up: int = 0  # client -> broker
    down: int = 0  # broker -> client
    head: bytes = b""  # the first bytes the client sent (its CONNECT)

    @property
    def client_id(self) -> str | None:
        return connect_client_id(self.head)


def connect_client_id(data: bytes) -> str | None:
    """The client id of an MQTT 3.1.1 CONNECT at the start of `data` (None: not (yet) a whole CONNECT head)."""
    if len(data) < 2 or data[0] >> 4 != 1:
        return None
    i, mult = 1, 1
    while i < len(data) and data[i] & 0x80:  # the remaining-length varint
        mult *= 128
        i += 1
    i += 1
    # protocol name (2 + len), level, flags, keep-alive
    if len(data) < i + 2:
        return None
    name_len = int.from_bytes(data[i:i + 2], "big")
    i += 2 + name_len + 1 + 1 + 2
    if len(data) < i + 2:
        return None
    n = int.from_bytes(data[i:i + 2], "big")
    if len(data) < i + 2 + n:
        return None
    return data[i + 2:i + 2 + n].decode("utf-8", "replace")


class ByteProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.conns: list[Conn] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._drops = False
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.listener, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="byte-proxy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._drops:
                self._drops = False
                for key in list(self._sel.get_map().values()):
                    if key.data is not None:
                        self._close(key.fileobj)  # type: ignore[arg-type]
            for key, _ in self._sel.select(timeout=0.05):
                if key.data is None:
                    client, _ = self.listener.accept()
                    broker = socket.create_connection(self.upstream)
                    for s in (client, broker):
                        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conn = Conn()
                    with self._lock:
                        self.conns.append(conn)
                    self._sel.register(client, selectors.EVENT_READ, (conn, client, broker, True))
                    self._sel.register(broker, selectors.EVENT_READ, (conn, broker, client, False))
                    continue
                conn, src, dst, upward = key.data
                try:
                    data = src.recv(1 << 16)
                except OSError:
                    data = b""
                if not data:
                    self._close(src, dst)
                    continue
                with self._lock:
                    if upward:
                        conn.up += len(data)
                        if len(conn.head) < 512:
                            conn.head += data[:512]
                    else:
                        conn.down += len(data)
                try:
                    dst.sendall(data)
                except OSError:
                    self._close(src, dst)

    def _close(self, *socks: socket.socket) -> None:
        for s in socks:
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError):
                pass
            try:
                s.close()
            except OSError:
                pass

    def drop_all(self) -> None:
        """Cut every open connection (as a network outage would); new ones are still relayed."""
        self._drops = True

    def by_client(self) -> dict[str, tuple[int, int]]:
        """client id -> (bytes up, bytes down) over all its connections."""
        out: dict[str, tuple[int, int]] = {}
        with self._lock:
            for c in self.conns:
                cid = c.client_id or "?"
                up, down = out.get(cid, (0, 0))
                out[cid] = (up + c.up, down + c.down)
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for key in list(self._sel.get_map().values()):
            self._close(key.fileobj)  # type: ignore[arg-type]
