#!/usr/bin/env python3
"""Subscribe as one endpoint and print every event it receives.

    python examples/subscribe.py --token "$TOKEN" --user dev-user --endpoint my-tab [--port 1883] [--websocket]

Needs paho-mqtt (`.venv/bin/pip install paho-mqtt`, or `scripts/setup test`). The endpoint is
registered by the CONNECT itself if it does not exist yet; Ctrl-C disconnects cleanly.
"""

from __future__ import annotations

import argparse
import sys

import paho.mqtt.client as mqtt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--token", required=True, help="the JWT (the MQTT password)")
    parser.add_argument("--user", required=True, help="the user id (the MQTT username)")
    parser.add_argument("--endpoint", required=True, help="the endpoint id (the MQTT client id)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="1883 for TCP, 8080 with --websocket")
    parser.add_argument("--websocket", action="store_true", help="MQTT over WebSocket at /ws")
    args = parser.parse_args()
    port = args.port or (8080 if args.websocket else 1883)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=args.endpoint,
                         transport="websockets" if args.websocket else "tcp")
    if args.websocket:
        client.ws_set_options(path="/ws")
    client.username_pw_set(args.user, args.token)

    def on_connect(client: mqtt.Client, _: object, flags: object, code: mqtt.ReasonCode, props: object) -> None:
        if code.is_failure:
            print(f"refused: {code}", file=sys.stderr)
            client.disconnect()
            return
        client.subscribe(f"users/endpoints/{args.endpoint}", qos=1)
        print(f"connected; waiting for events on users/endpoints/{args.endpoint}", file=sys.stderr)

    client.on_connect = on_connect
    client.on_message = lambda c, u, message: print(message.payload.decode(), flush=True)
    client.connect(args.host, port, keepalive=30)
    try:
        client.loop_forever()
    except KeyboardInterrupt:
        client.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
