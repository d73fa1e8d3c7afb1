"""Cheap log output for the request path: records made without a stack walk, lines written
in batches.

Every request writes one access-log line. Through ``Logger.info`` that costs a walk up the
stack for the caller's file and line (which no line of ours prints) and, on a line-buffered
stderr, one ``write`` system call per line. `log_fields` builds the record directly; the
`BatchingStreamHandler` collects the lines formatted during one turn of the event loop and
writes them at its end, so a busy router makes one system call for many lines.

Batches are cut at `ATOMIC_WRITE_BYTES` on line boundaries: the router's processes share one
stderr, and a pipe keeps a write whole (never interleaved with another process's) only up to
``PIPE_BUF`` bytes. A line of WARNING or above flushes at once, and so does every line
emitted outside a running event loop (start-up, shutdown, other threads), so nothing that
explains a crash waits in a buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TextIO

ATOMIC_WRITE_BYTES = 4096
"""POSIX's minimum ``PIPE_BUF``: writes up to this size reach a pipe unbroken."""


def log_fields(logger: logging.Logger, msg: str, fields: dict[str, object]) -> None:
    """``logger.info(msg, extra={"fields": fields})`` without the caller lookup (the record's
    file, line and function are left empty)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    record = logger.makeRecord(
        logger.name, logging.INFO, "", 0, msg, (), None, extra={"fields": fields}
    )
    logger.handle(record)


def split_batches(lines: list[str], limit: int = ATOMIC_WRITE_BYTES) -> list[str]:
    """Join ``lines`` (each ending in a newline) into as few strings as possible, none over
    ``limit`` bytes as stderr encodes them (UTF-8, lone surrogates backslash-escaped) unless
    it is a single line that is longer on its own."""
    batches: list[str] = []
    current: list[str] = []
    size = 0
    for line in lines:
        width = len(line) if line.isascii() else len(line.encode("utf-8", "backslashreplace"))
        if current and size + width > limit:
            batches.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += width
    if current:
        batches.append("".join(current))
    return batches


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A `logging.StreamHandler` that writes the lines of one event-loop turn together."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None
        """The loop that will write the pending lines at the end of its turn."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        if record.levelno >= logging.WARNING:
            self._write_pending()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: nobody would run the flush
            self._write_pending()
            return
        # Compared by identity, so a loop that closed before its flush ran (and any other
        # loop) does not leave the lines waiting: this loop schedules its own.
        if self._flush_on is not loop:
            self._flush_on = loop
            loop.call_soon(self._flush_scheduled)

    def _flush_scheduled(self) -> None:
        self.acquire()
        try:
            self._flush_on = None
            self._write_pending()
        finally:
            self.release()

    def _write_pending(self) -> None:
        """Write what is pending (the caller holds the handler's lock)."""
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        # A closed or broken stderr must not take the request that logged down with it.
        with contextlib.suppress(OSError, ValueError):
            for batch in split_batches(lines):
                self.stream.write(batch)
            self.stream.flush()

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_pending()
        finally:
            self.release()

    def close(self) -> None:
        self.flush()
        super().close()
