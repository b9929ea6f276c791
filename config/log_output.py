"""Log output: stderr, block-buffered, flushed at least every quarter second.

The stock StreamHandler flushes after every record, and Python's stderr is line
buffered, so each log line costs a write system call. sendEvent logs one line
per event, so at thousands of events per second that is a large part of the
service's CPU. Here records collect in a 64 KiB buffer that is flushed when it
fills, at least every FLUSH_INTERVAL seconds, at once for WARNING and above,
and at exit. At most a quarter second of INFO lines can be lost if the process
is killed outright.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
from typing import Any

import orjson

from observability.context import request_id

FLUSH_INTERVAL = 0.25
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class CachedTimeFormatter(logging.Formatter):
    """Formats the timestamp's seconds once per second instead of once per record."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._second = -1
        self._text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second, self._text = second, time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
        return f"{self._text},{int(record.msecs):03d}"


class TextFormatter(logging.Formatter):
    """FORMAT; inside an HTTP request, its id after the logger name (the message stays last, parseable)."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._plain = CachedTimeFormatter(fmt)
        self._with_id = CachedTimeFormatter(fmt.replace("%(name)s:", "%(name)s [%(request_id)s]:"))

    def format(self, record: logging.LogRecord) -> str:
        rid = request_id.get()
        if rid is None:
            return self._plain.format(record)
        record.request_id = rid
        return self._with_id.format(record)


# LogRecord's own attributes: anything else on a record came from `extra=` and is a structured field.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime",
                                                                                          "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message, request_id, and `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                         + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            entry["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class BufferedStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    def __init__(self) -> None:
        raw = io.FileIO(sys.stderr.fileno(), "w", closefd=False)
        stream = io.TextIOWrapper(io.BufferedWriter(raw, buffer_size=64 * 1024), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=False, write_through=False)
        super().__init__(stream)
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_periodically, name="log-flush", daemon=True)
        self._flusher.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            with self.lock:  # type: ignore[union-attr]
                self.stream.write(message + self.terminator)
                if record.levelno >= logging.WARNING:
                    self.stream.flush()
        except Exception:
            self.handleError(record)

    def _flush_periodically(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self.flush()
        super().close()


def configure_logging(level: str, log_format: str = "text") -> None:
    # The logging HOWTO's optimisations: no caller frame lookup, no thread or
    # process names (none of them is in FORMAT).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BufferedStderrHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # amqtt logs every connection and `transitions` every state change at INFO.
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
