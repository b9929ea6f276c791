"""Log output: stderr, written by a thread of its own, never by the event loop.

sendEvent logs one line per event. The stock StreamHandler writes each record with a system
call on the caller's thread, and a block buffer still writes on the caller's thread each time
it fills: thousands of times a second, and whenever the disk is slow (writeback) that write
blocks the event loop. Measured on a busy machine, INFO logging took 136 against 91 ms of CPU
per 1,000 sendEvents. Here a record is formatted on the caller's thread (the request id is a
context variable there) and appended to a list; the writer thread writes the list at least
every FLUSH_INTERVAL seconds, at once for WARNING and above, and at close. At most a quarter
second of lines can be lost if the process is killed outright. Past WAKE_PENDING_BYTES the
writer is woken at once, so that lines do not pile up in memory. If the output cannot keep up,
INFO lines beyond MAX_PENDING_BYTES are dropped, counted, and reported in the log once it can.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

import orjson

from observability.context import request_id

FLUSH_INTERVAL = 0.25
# INFO lines waiting to be written, at most; beyond it they are dropped (and counted).
MAX_PENDING_BYTES = 16 * 1024 * 1024
# Beyond this the writer is woken at once instead of at its next quarter second, so that a
# burst (or lines carrying large events) never sits in memory for long.
WAKE_PENDING_BYTES = 256 * 1024
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# ",000" to ",999": the timestamp's milliseconds, looked up rather than formatted for each line.
_MILLISECONDS = tuple(f",{ms:03d}" for ms in range(1000))


class TextFormatter(logging.Formatter):
    """FORMAT; inside an HTTP request, its id after the logger name (the message stays last, parseable).

    The line is built with one f-string, and the timestamp's seconds once per second: sendEvent
    logs a line per event, and logging.Formatter's generic path (a `%` over the record's dict,
    usesTime() per record) cost a fifth of that line.
    """

    def __init__(self) -> None:
        super().__init__(FORMAT)
        # (second, its text) in one attribute: records are formatted on more than one thread.
        self._second_text = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        cached, text = self._second_text
        if second != cached:
            text = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
            self._second_text = (second, text)
        return text + _MILLISECONDS[int(record.msecs)]

    def format(self, record: logging.LogRecord) -> str:
        record.message = message = record.getMessage()
        rid = request_id.get()
        head = f"{self.formatTime(record)} {record.levelname} {record.name}"
        line = f"{head}: {message}" if rid is None else f"{head} [{rid}]: {message}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


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


class BufferedStderrHandler(logging.Handler):
    """Formats on the caller's thread; a writer thread does every write (see the module docstring)."""

    def __init__(self, fd: int | None = None) -> None:
        super().__init__()
        self._fd = sys.stderr.fileno() if fd is None else fd
        # Guarded by a lock of its own, held only to append or swap: never the Handler's own lock,
        # which logging.shutdown holds while it calls flush(); a writer holding _write_lock and
        # waiting for that one would hang the process at exit.
        self._pending_lock = threading.Lock()
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._dropped = 0
        self._write_lock = threading.Lock()  # one writer at a time, so lines keep their order
        self._wake = threading.Event()
        self._closing = False
        self._writer = threading.Thread(target=self._write_periodically, name="log-writer", daemon=True)
        self._writer.start()

    def handle(self, record: logging.LogRecord) -> bool:
        """Filter and emit, without the Handler's lock: emit guards what it shares with its own."""
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        urgent = record.levelno >= logging.WARNING
        with self._pending_lock:
            if self._pending_bytes > MAX_PENDING_BYTES and not urgent:
                self._dropped += 1
                return
            self._pending.append(line)
            pending = self._pending_bytes = self._pending_bytes + len(line)
        if (urgent or pending >= WAKE_PENDING_BYTES) and not self._wake.is_set():
            self._wake.set()

    def flush(self) -> None:
        with self._write_lock:
            with self._pending_lock:
                lines, self._pending, self._pending_bytes = self._pending, [], 0
                dropped, self._dropped = self._dropped, 0
            if dropped:
                lines.append(self.format(logging.LogRecord(
                    __name__, logging.WARNING, "", 0,
                    "%d log lines were dropped: the log output did not keep up", (dropped,), None)) + "\n")
            if lines:
                self._write("".join(lines).encode("utf-8", "backslashreplace"))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except InterruptedError:
                continue
            except OSError:
                return  # stderr is gone (a closed pipe): nowhere left to say so
            view = view[written:]

    def _write_periodically(self) -> None:
        while not self._closing:
            self._wake.wait(FLUSH_INTERVAL)
            self._wake.clear()
            self.flush()

    def close(self) -> None:
        self._closing = True
        self._wake.set()
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
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # amqtt logs every connection and `transitions` every state change at INFO.
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
