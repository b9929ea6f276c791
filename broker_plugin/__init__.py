"""The MQTT side: an amqtt broker whose connections are endpoint registrations.

- `plugin.EndpointPlugin`: the amqtt plugin; one callback per broker event, over the domain core.
- `broker.EndpointBroker`: amqtt's Broker with a connection path that authenticates first.
- `connection.MqttConnection`: one client connection, sans-IO, shared by TCP and WebSocket.
"""
