"""The do-it-yourself HTTP publisher that sits beside a plain broker (Mosquitto or bare amqtt).

    python -m bench.diy_publisher --broker-port P --http-port Q   (secret in BENCH_JWT_SECRET)

What someone would write in an afternoon instead of endpoint-broker: Starlette on
uvicorn (one process), one aiomqtt client kept connected to the broker, and one
route taking the same sendEvent body. It checks the bearer token (HS256, same
secret) and the organisation, then publishes the event JSON once to
`user/{userId}`; every endpoint of that user subscribes to that topic, and the
broker does the fan-out. qos 1 publishes at QoS 1 and answers after the broker's
PUBACK. It answers 1 (messages published): it cannot know how many endpoints
received the event.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import AsyncIterator

import aiomqtt
import jwt
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SERVICE_ROLES = {"SERVICE", "ROLE_SERVICE"}


def create_app(broker_port: int, secret: str) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # aiomqtt binds to the running loop, so the client is made here, not at import.
        async with aiomqtt.Client("127.0.0.1", broker_port, identifier="diy-publisher") as client:
            app.state.mqtt = client
            yield

    async def send_event(request: Request) -> Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        try:
            claims = jwt.decode(token, secret, algorithms=["HS256"])
        except jwt.PyJWTError:
            return JSONResponse({"detail": "invalid token"}, status_code=401)
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"detail": "body is not JSON"}, status_code=400)
        user_id, event = body.get("userId"), body.get("event")
        if scheme.lower() != "bearer" or not isinstance(user_id, str) or not isinstance(event, dict):
            return JSONResponse({"detail": "userId and event are required"}, status_code=400)
        is_service = bool(SERVICE_ROLES & set(claims.get("authorities", [])))
        organization = body.get("organizationId")
        if not is_service and organization not in (None, claims.get("organization_id")):
            return JSONResponse({"detail": "another organisation"}, status_code=403)
        client: aiomqtt.Client = request.app.state.mqtt
        await client.publish(f"user/{user_id}", json.dumps(event), qos=1 if body.get("qos") == 1 else 0)
        return JSONResponse(1)

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
    app = create_app(args.broker_port, os.environ["BENCH_JWT_SECRET"])
    uvicorn.run(app, host="127.0.0.1", port=args.http_port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
