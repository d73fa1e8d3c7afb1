"""Opening JSON-lines files (traces, run records), gzip-compressed when named ``*.gz``."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import IO, Literal


def open_text(path: Path, mode: Literal["r", "w"]) -> IO[str]:
    """Open ``path`` for text reading ("r") or writing ("w"); gzip if it ends in ``.gz``."""
    if path.suffix == ".gz":
        # Level 1: traces are large and repetitive; speed matters more than the last few MB.
        if mode == "r":
            return gzip.open(path, "rt", encoding="utf-8")
        return gzip.open(path, "wt", encoding="utf-8", compresslevel=1)
    return open(path, mode, encoding="utf-8")
