"""The domain core: endpoint table, expiry, principals, event rules.

Plain Python on purpose: nothing here imports amqtt or Starlette, so the MQTT
plugin and the HTTP bridge are thin adapters over the same table and rules.
"""
