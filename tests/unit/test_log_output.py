"""Log output on the request path: records without a stack walk, lines written per loop turn
in pipe-atomic batches, warnings and lines outside a loop at once."""

from __future__ import annotations

import asyncio
import io
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.log_output import (
    ATOMIC_WRITE_BYTES,
    BatchingStreamHandler,
    log_fields,
    split_batches,
)


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.fixture
def logger() -> logging.Logger:
    named = logging.getLogger("prefix_router.test_log_output")
    named.handlers.clear()
    named.setLevel(logging.INFO)
    named.propagate = False
    return named


def _attach(logger: logging.Logger) -> tuple[BatchingStreamHandler, CountingStream]:
    stream = CountingStream()
    handler = BatchingStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    return handler, stream


_line = st.text(st.characters(exclude_characters="\n"), max_size=3000).map(lambda s: s + "\n")


@settings(max_examples=200, deadline=None)
@given(st.lists(_line, max_size=30))
def test_batches_keep_every_line_and_stay_pipe_atomic(lines: list[str]) -> None:
    """Batching loses, splits and reorders nothing; no batch of several lines exceeds PIPE_BUF."""
    batches = split_batches(lines)
    assert "".join(batches) == "".join(lines)
    for batch in batches:
        size = len(batch.encode("utf-8", "backslashreplace"))
        assert size <= ATOMIC_WRITE_BYTES or batch.count("\n") == 1


async def test_lines_of_one_loop_turn_are_written_together(logger: logging.Logger) -> None:
    """Access lines logged in one loop turn reach stderr in one write, at the turn's end."""
    _, stream = _attach(logger)
    for i in range(5):
        log_fields(logger, f"request {i}", {"i": i})
    assert stream.writes == []
    await asyncio.sleep(0)  # one loop turn: the scheduled flush runs
    assert stream.writes == ["".join(f"INFO request {i}\n" for i in range(5))]


async def test_a_warning_is_written_at_once(logger: logging.Logger) -> None:
    """A warning (and the lines queued before it) is written without waiting for the turn."""
    _, stream = _attach(logger)
    logger.info("first")
    logger.warning("trouble")
    assert stream.getvalue() == "INFO first\nWARNING trouble\n"


def test_lines_outside_a_loop_are_written_at_once(logger: logging.Logger) -> None:
    """Start-up and shutdown lines (no running loop) do not wait in a buffer."""
    _, stream = _attach(logger)
    logger.info("starting")
    assert stream.getvalue() == "INFO starting\n"


async def test_flush_and_close_write_what_is_pending(logger: logging.Logger) -> None:
    """Closing the handler (logging.shutdown at exit) writes the lines still pending."""
    handler, stream = _attach(logger)
    logger.info("last words")
    handler.close()
    assert stream.getvalue() == "INFO last words\n"


def test_log_fields_carries_the_fields_and_respects_the_level(logger: logging.Logger) -> None:
    """The record has the fields for the JSON formatter; below INFO nothing is built."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger.addHandler(Keep())
    log_fields(logger, "request", {"status": 200})
    assert [(r.getMessage(), getattr(r, "fields", None)) for r in records] == [
        ("request", {"status": 200})
    ]
    logger.setLevel(logging.WARNING)
    log_fields(logger, "request", {"status": 200})
    assert len(records) == 1
