"""The soak harness (`python -m load_tests soak`) end to end with a short duration, and its
verdict on made-up series: a leak fails it, a cache filling up to its bound does not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from load_tests.soak import SoakConfig
from load_tests.soak_verdict import SERIES, judge

DURATION = 20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIB = 2**20


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_short_soak_runs_samples_and_finds_nothing_growing(tmp_path: Path) -> None:
    """A 20 s soak answers every request, samples the router's resources, writes soak.json,
    soak.md and soak.png, judges every series flat, and leaves no process behind."""
    out = tmp_path / "soak"
    argv = [sys.executable, "-m", "load_tests", "soak", "--out", str(out),
            "--duration", str(DURATION), "--sample-interval", "1"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=100, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    result = json.loads((out / "soak.json").read_text())
    requests = result["requests"]
    assert requests["sent"] > DURATION * 10
    assert requests["ok"] == requests["sent"], requests["error_kinds"]
    samples = result["samples"]
    assert len(samples) >= DURATION - 2
    for sample in samples:
        assert all(isinstance(sample[name], int) for name in SERIES), sample
    config = result["config"]
    bound = config["workers"] * config["cache_blocks"]
    assert 0 < max(s["index_blocks_total"] for s in samples) <= bound
    # Nothing grows without bound here: FDs stay within one per client connection of the
    # start, and once idle again the router runs as many tasks as before the load.
    first_fds = samples[0]["open_fds"]
    assert max(s["open_fds"] for s in samples) <= first_fds + config["concurrency"] + 8
    assert result["idle_after"]["asyncio_tasks"] <= result["idle_before"]["asyncio_tasks"] + 5
    verdict = result["verdict"]
    assert verdict["ok"], verdict
    assert verdict["rss_growth_last_half"] < 0.05
    assert "Verdict: **flat**" in (out / "soak.md").read_text()
    assert (out / "soak.png").read_bytes().startswith(PNG_MAGIC)
    assert not [name for name, pid in result["pids"].items() if _alive(pid)]


def _series(values: dict[str, list[float]], interval: float = 5.0) -> list[dict[str, Any]]:
    count = len(next(iter(values.values())))
    return [{"t": i * interval, **{name: values[name][i] for name in SERIES}} for i in range(count)]


def _flat(count: int, level: float) -> list[float]:
    return [level + (i % 3) for i in range(count)]


def test_verdict_fails_a_steady_leak() -> None:
    """RSS that keeps climbing at the same rate (a leak) is judged growing."""
    n = 120
    samples = _series(
        {
            "rss_bytes": [60 * MIB + i * 0.2 * MIB for i in range(n)],
            "open_fds": _flat(n, 30),
            "asyncio_tasks": _flat(n, 12),
            "index_blocks_total": _flat(n, 2048),
        }
    )
    verdict = judge(samples, SoakConfig(out=Path("unused")))
    assert not verdict["ok"]
    assert not verdict["series"]["rss_bytes"]["flattens"]
    assert not verdict["rss_growth_ok"]


def test_verdict_fails_leaking_descriptors() -> None:
    """File descriptors that grow by one every sample (a connection leak) are judged growing."""
    n = 120
    samples = _series(
        {
            "rss_bytes": _flat(n, 60 * MIB),
            "open_fds": [30.0 + i for i in range(n)],
            "asyncio_tasks": _flat(n, 12),
            "index_blocks_total": _flat(n, 2048),
        }
    )
    verdict = judge(samples, SoakConfig(out=Path("unused")))
    assert not verdict["ok"]
    assert not verdict["series"]["open_fds"]["flattens"]


def test_verdict_passes_growth_that_levels_off() -> None:
    """An index filling up to its bound and RSS that settles after warm-up are judged flat."""
    n = 120
    samples = _series(
        {
            "rss_bytes": [60 * MIB + min(i, 30) * 0.3 * MIB for i in range(n)],
            "open_fds": _flat(n, 30),
            "asyncio_tasks": _flat(n, 12),
            "index_blocks_total": [float(min(i * 100, 4096)) for i in range(n)],
        }
    )
    verdict = judge(samples, SoakConfig(out=Path("unused")))
    assert verdict["ok"], verdict
