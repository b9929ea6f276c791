"""The HTTP side: the Registration v1.0 REST contract and MQTT over WebSocket, on one Starlette app."""
