"""The broker's session-table entry for a live connection."""

from __future__ import annotations

from typing import Any

from amqtt.session import Session


class _AlwaysConnected:
    """Stands in for amqtt's per-session `transitions` state machine.

    Entries exist only while their connection is live (the connection removes its
    own entry), so the state is always "connected".
    """

    __slots__ = ()
    state = "connected"

    def is_connected(self) -> bool:
        return True


_CONNECTED = _AlwaysConnected()


class EndpointSession(Session):
    """amqtt's Session without its state machine and message queues.

    amqtt builds a `transitions.Machine` and two asyncio Queues per Session (tens
    of KB); this broker keeps queues per endpoint in the domain, so an entry needs
    only the identity fields amqtt and its plugins read. The client's password
    (its token) is deliberately not kept.
    """

    def __init__(  # Session.__init__ is skipped on purpose: see the class docstring.
        self, client_id: str, username: str | None, clean_session: bool, keep_alive: int, peer: str
    ) -> None:
        self.client_id = client_id
        self.username = username
        self.password = None
        self.clean_session = clean_session
        self.keep_alive = keep_alive
        self.remote_address, _, port = peer.rpartition(":")
        self.remote_port = int(port) if port.isdigit() else None
        self.transitions: Any = _CONNECTED
        self.is_anonymous = False
        self.will_flag = False
        self.attributes: dict[str, Any] = {}

    def clear_queues(self) -> None:
        """Nothing to clear: this session has no queues."""

    def __repr__(self) -> str:
        return f"EndpointSession(clientId={self.client_id})"
