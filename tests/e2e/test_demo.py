"""`python -m load_tests demo` end to end, as `make demo` runs it, with a short duration."""

from __future__ import annotations

import gzip
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from load_tests.report import PLOT_FILES
from load_tests.workload import read_trace

DURATION = 5.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_runs_both_policies_and_writes_the_report(tmp_path: Path) -> None:
    """The demo drives one trace through round robin and cache-aware, writes summary.json,
    report.md and the plots, and leaves no process behind."""
    out = tmp_path / "demo"
    argv = [sys.executable, "-m", "load_tests", "demo", "--out", str(out),
            "--duration", str(DURATION), "--seed", "3"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=100, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    trace = read_trace(out / "trace.jsonl.gz")
    sent = [r for r in trace.requests if r.offset < DURATION]
    assert sent, "the trace must hold requests inside the duration"
    assert list(summary["policies"]) == ["round_robin", "cache_aware"]
    for policy, figures in summary["policies"].items():
        assert figures["requests"] == len(sent)
        assert figures["errors"] == 0, figures["error_kinds"]
        assert figures["ok"] == len(sent)
        assert sum(w["requests"] for w in figures["workers"].values()) == len(sent)
        assert set(figures["workers"]) == {"w0", "w1", "w2", "w3"}
        assert sum(figures["decisions"].values()) == len(sent)
        assert figures["load_source"] == "admin"
        assert 0.0 <= figures["cached_token_ratio"] <= 1.0
        assert figures["prompt_tokens"] > 0
        assert figures["ttft_ms"]["p50"] > 0
        run = figures["run"]
        assert run["policy"] == policy
        for process in run["processes"]:
            assert not _alive(process["pid"]), f"{process['name']} was left running"
            assert Path(process["log"]).is_file()
    records = [json.loads(line) for line in _lines(out / "runs" / "cache_aware.jsonl.gz")]
    policies = {r["decision"]["policy"] for r in records if r.get("kind") == "request"}
    assert policies == {"cache_aware"}

    comparison = summary["comparison"]
    assert comparison["baseline"] == "round_robin"
    assert comparison["candidate"] == "cache_aware"
    ca, rr = summary["policies"]["cache_aware"], summary["policies"]["round_robin"]
    assert comparison["cached_token_ratio_gain"] == round(
        ca["cached_token_ratio"] / rr["cached_token_ratio"], 4
    )
    report = (out / "report.md").read_text()
    assert "| round_robin |" in report
    assert "| cache_aware |" in report
    assert "cache_aware/round_robin" in report
    for name in PLOT_FILES:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    assert "cached-token ratio" in done.stdout


def _lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as src:
        return [line for line in src if line.strip()]


@pytest.mark.parametrize(
    ("sig", "when"),
    [
        # Ctrl-C while the trace is running (inside the runner's event loop).
        (signal.SIGINT, b"[round_robin] "),
        # SIGTERM (a CI timeout) while the demo waits for the router to see its workers.
        (signal.SIGTERM, b"started round_robin/router"),
    ],
    ids=["ctrl-c-while-running", "sigterm-while-starting"],
)
def test_interrupted_demo_stops_every_process(
    tmp_path: Path, sig: signal.Signals, when: bytes
) -> None:
    """Ctrl-C or SIGTERM part-way through stops every worker and router the demo started."""
    argv = [sys.executable, "-m", "load_tests", "demo", "--out", str(tmp_path / "demo"),
            "--duration", "20"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    output = b""
    deadline = time.monotonic() + 60
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while when not in output:
                assert time.monotonic() < deadline, output.decode(errors="replace")
                if selector.select(timeout=0.5):
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    assert chunk, output.decode(errors="replace")
                    output += chunk
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (output + rest).decode(errors="replace")
    assert proc.returncode == 130, text[-3000:]
    assert "interrupted; every started process was stopped" in text
    assert "Traceback" not in text
    pids = [int(p) for p in re.findall(r"\(pid (\d+),", text)]
    assert len(pids) == 5, text[-3000:]
    assert not [pid for pid in pids if _alive(pid)]
