"""The lean HTTP publisher beside Mosquitto: the leanest stack someone could build (issue 13's baseline).

    python -m bench.lean_publisher --broker-port P --http-port Q

Starlette on uvicorn with uvloop and httptools, orjson, and one aiomqtt client
kept connected to the broker. Unlike the DIY publisher it checks NO token and
targets one endpoint: it publishes each sendEvent body's event once to
`users/endpoints/{userEndpointId}`, the topic that endpoint subscribes to (as on
endpoint-broker). qos 1 publishes at QoS 1 and answers after the broker's PUBACK.
It answers the count of endpoints, as endpoint-broker does: 1, the one it published to.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import aiomqtt
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

# paho's default is 20 QoS 1 messages in flight; past that it queues. 32 workers must never wait on it.
MAX_INFLIGHT = 1000
ONE = b"1"


def create_app(broker_port: int) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # aiomqtt binds to the running loop, so the client is made here, not at import.
        async with aiomqtt.Client("127.0.0.1", broker_port, identifier="lean-publisher",
                                  max_inflight_messages=MAX_INFLIGHT) as client:
            app.state.mqtt = client
            yield

    async def send_event(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return JSONResponse({"detail": "body is not JSON"}, status_code=400)
        endpoint_id = body.get("userEndpointId") if isinstance(body, dict) else None
        event = body.get("event") if isinstance(body, dict) else None
        # Only what keeps the publish itself valid: a topic level without wildcards.
        if not isinstance(endpoint_id, str) or not endpoint_id or not isinstance(event, dict) \
                or "/" in endpoint_id or "+" in endpoint_id or "#" in endpoint_id:
            return JSONResponse({"detail": "userEndpointId (one topic level) and event are required"},
                                status_code=400)
        client: aiomqtt.Client = request.app.state.mqtt
        await client.publish(f"users/endpoints/{endpoint_id}", orjson.dumps(event),
                             qos=1 if body.get("qos") == 1 else 0)
        return Response(ONE, media_type="application/json")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/rtc-api/users/endpoints/sendEvent", send_event, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--broker-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(args.broker_port), host="127.0.0.1", port=args.http_port, loop="uvloop",
                http="httptools", log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
