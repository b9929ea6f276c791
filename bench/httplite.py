"""A lean HTTP/1.1 keep-alive client on an asyncio.Protocol with httptools' response parser.

httpx spends ~100 us of Python per request; the benchmark would then measure
its own client. One connection here carries one request at a time (no
pipelining), exactly like a pool connection of any ordinary HTTP client.
"""

from __future__ import annotations

import asyncio
from typing import cast

import httptools


class HttpError(Exception):
    """The connection broke before a complete response arrived."""


class HttpConnection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._body = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(HttpError(f"connection lost: {exc or 'closed by server'}"))

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_exception(HttpError(f"bad response: {exc}"))
            self.close()

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result((self._parser.get_status_code(), bytes(self._body)))
        self._body.clear()

    # public
    async def request(self, raw: bytes, timeout_s: float) -> tuple[int, bytes]:
        """Send one complete raw request; return the status code and the body."""
        if self.closed or self.transport is None:
            raise HttpError("connection closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        try:
            return await asyncio.wait_for(self._waiter, timeout_s)
        finally:
            self._waiter = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_connection(host: str, port: int, timeout_s: float) -> HttpConnection:
    loop = asyncio.get_running_loop()
    _, connection = await asyncio.wait_for(loop.create_connection(HttpConnection, host, port), timeout_s)
    return connection


def post_request(host: str, port: int, path: str, token: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body
