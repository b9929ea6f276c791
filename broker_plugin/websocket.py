"""MQTT over WebSocket through amqtt's `external` listener.

The HTTP bridge accepts the WebSocket at /ws and hands a `MessageChannel` to the
broker; these adapters turn it into amqtt's ReaderAdapter/WriterAdapter pair for
`Broker.external_connected`. Nothing here imports Starlette.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from amqtt.adapters import ReaderAdapter, WriterAdapter

log = logging.getLogger("endpoint_broker.mqtt")


class MessageChannel(Protocol):
    """A message-oriented duplex channel: one WebSocket."""

    @property
    def peer(self) -> tuple[str, int] | None: ...

    async def receive(self) -> bytes:
        """The next non-empty binary message, or b"" once the channel is closed."""
        ...

    async def send(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class ChannelReader(ReaderAdapter):
    def __init__(self, channel: MessageChannel) -> None:
        self._channel = channel
        self._buffer = bytearray()

    async def read_chunk(self) -> bytes:
        """Whatever arrives next, as one chunk (b"" when closed)."""
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            return data
        return await self._channel.receive()

    async def read(self, n: int = -1) -> bytes:
        """amqtt's contract: exactly `n` bytes (fewer at EOF), or the next chunk when n < 0."""
        if n < 0:
            return await self.read_chunk()
        while len(self._buffer) < n:
            chunk = await self._channel.receive()
            if not chunk:
                break
            self._buffer += chunk
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def feed_eof(self) -> None:
        """Nothing to do: EOF is the channel closing."""


class ChannelWriter(WriterAdapter):
    def __init__(self, channel: MessageChannel) -> None:
        self._channel = channel
        self._pending = bytearray()

    def write(self, data: bytes) -> None:
        self._pending += data

    async def drain(self) -> None:
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            await self._channel.send(data)

    def get_peer_info(self) -> tuple[str, int] | None:
        return self._channel.peer

    def get_ssl_info(self) -> None:
        return None

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.drain()
        await self._channel.close()


class AdapterSink:
    """A connection Sink over an amqtt WriterAdapter.

    `write` is synchronous (the domain publishes from plain function calls), so
    bytes are buffered in the adapter and sent by one flusher task at a time,
    which exists only while there is something to send.
    """

    def __init__(self, writer: WriterAdapter) -> None:
        self._writer = writer
        self._unsent = 0
        self._closing = False
        self._flusher: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()

    def write(self, data: bytes) -> None:
        if self._closing:
            return
        self._writer.write(data)
        self._unsent += len(data)
        self._kick()

    def buffered(self) -> int:
        return self._unsent

    def close(self) -> None:
        self._closing = True
        self._kick()

    async def closed(self) -> None:
        await self._closed.wait()

    def _kick(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        try:
            while self._unsent:
                sending = self._unsent
                await self._writer.drain()
                self._unsent -= sending
            if self._closing:
                await self._writer.close()
                self._closed.set()
        except Exception as exc:
            log.debug("websocket write failed: %r", exc)
            self._closing = True
            self._unsent = 0
            with contextlib.suppress(Exception):
                await self._writer.close()
            self._closed.set()
        finally:
            self._flusher = None
        if self._unsent and not self._closing:
            self._kick()  # written while the last drain finished
