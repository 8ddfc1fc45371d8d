"""The callback and last-will types every `Link` implementation shares (fedfleet.edge_agent.wire.link).

Kept apart from link.py, which imports the implementations, so that they can use these types without an
import cycle."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["ConnectHandler", "MessageHandler", "Will", "WillMessage"]

MessageHandler = Callable[[str, bytes], None]  # (topic, payload), on the link's thread
ConnectHandler = Callable[[], None]  # after every accepted (re)connection, on the link's thread
WillMessage = tuple[str, bytes, bool]  # (topic, payload, retain); published at QoS 1
Will = WillMessage | Callable[[], WillMessage]  # or a callable asked for a fresh one before every connection
