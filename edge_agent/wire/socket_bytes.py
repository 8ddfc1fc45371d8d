"""Bytes a connection's socket really moved: the kernel's TCP counters, TLS records and MQTT control included.

The ledger's byte counts are a formula over MQTT framing (`protocol.mqtt_publish_bytes`). What the radio
carries is more: CONNECT and SUBSCRIBE, keep-alives, the TLS handshake and record overhead on mqtts://.
`tcp_bytes(sock)` reads Linux's `TCP_INFO` (TCP payload bytes sent, retransmissions counted once, and
received), which sees all of it, whatever wraps the socket. `WireCounter`
adds them up over the reconnects of one link. Where `TCP_INFO` has no such fields (not Linux, or a kernel
older than 4.2) the counts are None, never a guess.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any

# struct tcp_info (linux/tcp.h): tcpi_bytes_acked and tcpi_bytes_received are the u64s at offsets 120 and 128;
# tcpi_notsent_bytes (Linux 4.6+) the u32 at 144; tcpi_bytes_sent and tcpi_bytes_retrans (Linux 4.19+) the u64s
# at 200 and 208
_BYTES_ACKED_AT = 120
_INFO_LEN = 136
_NOTSENT_AT = 144
_BYTES_SENT_AT = 200
_FULL_LEN = 216


def tcp_bytes(sock: Any) -> tuple[int, int] | None:
    """(bytes sent, bytes received) on this TCP socket so far, or None where unknown. Sent is the payload written
    to the socket, counted once: handed to the network (`tcpi_bytes_sent - tcpi_bytes_retrans`, so a message
    counts before its ACK) plus what the kernel holds back for now (`tcpi_notsent_bytes`: TCP small queues can
    defer a burst, so a message just written counts at once); on kernels without those fields, the bytes
    acknowledged."""
    if not hasattr(socket, "TCP_INFO"):
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _FULL_LEN)
    except (AttributeError, OSError, ValueError):
        return None
    if len(raw) < _INFO_LEN:
        return None
    acked, received = struct.unpack_from("=QQ", raw, _BYTES_ACKED_AT)
    if len(raw) >= _FULL_LEN:
        sent, retrans = struct.unpack_from("=QQ", raw, _BYTES_SENT_AT)
        (notsent,) = struct.unpack_from("=I", raw, _NOTSENT_AT)
        return int(sent - retrans + notsent), int(received)
    return int(acked), int(received)


class WireCounter:
    """Socket bytes of one link over all its connections: closed sockets' totals plus the open one's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: Any = None
        self._closed = [0, 0]
        self.known = True  # False once a socket's counters could not be read

    def opened(self, sock: Any) -> None:
        with self._lock:
            self._sock = sock
            if tcp_bytes(sock) is None:
                self.known = False

    def closed(self, sock: Any) -> None:
        with self._lock:
            counts = tcp_bytes(sock)
            if counts is not None:
                self._closed[0] += counts[0]
                self._closed[1] += counts[1]
            if sock is self._sock:
                self._sock = None

    def totals(self) -> tuple[int, int] | None:
        """(sent, received) so far, or None if the platform cannot tell."""
        with self._lock:
            if not self.known:
                return None
            sent, received = self._closed
            if self._sock is not None:
                counts = tcp_bytes(self._sock)
                if counts is not None:
                    sent, received = sent + counts[0], received + counts[1]
            return sent, received
