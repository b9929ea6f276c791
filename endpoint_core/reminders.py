"""UserEndpointKeepAliveRequestedEvent: our definition (no public source defines it).

Sent on the endpoint's topics at QoS 0 shortly before its keepalive deadline, at
most once per keepalive period, when `serverKeepAliveReminderOn` is true.
QoS 0 on purpose: a PUBACK would count as a keepalive, so a QoS 1 reminder would
keep a silent client alive by itself.
"""

from __future__ import annotations

import time
import uuid

import orjson

from endpoint_core.clock import iso_instant

REMINDER_EVENT_TYPE = "UserEndpointKeepAliveRequestedEvent"


def keepalive_reminder(endpoint_id: str, user_id: str, expires_at_unix: float) -> bytes:
    """The event as JSON bytes. `expiresAt` is when the keepalive lapses (the endpoint turns SICK)."""
    event = {
        "type": REMINDER_EVENT_TYPE,
        "timestamp": iso_instant(time.time()),
        "id": str(uuid.uuid4()),
        "userId": user_id,
        "userEndpointId": endpoint_id,
        "expiresAt": iso_instant(expires_at_unix),
    }
    return orjson.dumps(event)
