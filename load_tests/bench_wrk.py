"""The benchmark's load generator: Debian's ``wrk`` driven by a generated Lua script.

wrk is written in C on an epoll loop; one of its threads sends tens of thousands of small
requests per second on one core, so on a 2-core machine it is not what limits the figures
(a Python client would be). The Lua script pre-formats every request once per thread, from
a file of JSON bodies (one per line), and cycles through them, so each request is a
different ~7 KB chat body at no per-request cost. ``done()`` prints one ``BENCH_JSON`` line
with the counts, the errors and the latency percentiles (wrk measures them in microseconds,
from the first byte written to the last byte read of each response).

Rate-limited points use wrk's ``delay()`` hook: after each response a connection waits
``delay_ms`` before sending again, so ``connections`` connections offer about
``connections / (delay + latency)`` requests per second; latency is timed from the write,
so the wait is not in it; `rate_plan` picks the connections and the delay for a rate. The
achieved rate is measured, not assumed. `chat_bodies` makes the seeded ~7 KB chat bodies.

`ensure_wrk` installs the package with apt-get when it is missing and we are root (as
``.ci/run`` does for redis-server); otherwise it says how to install it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
_MARK = "BENCH_JSON "

_LUA = r"""
local path, method_path, delay_ms = "%(bodies)s", "%(path)s", %(delay_ms)d
local requests, count, i = {}, 0, 0
local headers = {["Content-Type"] = "application/json"}

local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("offset", %(offset_step)d * threads)
end

function init(args)
  for line in io.lines(path) do
    count = count + 1
    requests[count] = wrk.format("POST", method_path, headers, line)
  end
  i = (offset or 0) %% count
end

function request()
  i = i %% count + 1
  return requests[i]
end
%(delay_fn)s
function done(summary, latency, requests)
  local p = {}
  for _, q in ipairs({%(percentiles)s}) do
    p[#p + 1] = string.format('"%%s": %%d', tostring(q), latency:percentile(q))
  end
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests": %%d, "duration_us": %%d, "bytes": %%d, "connect": %%d, "read": %%d, ' ..
    '"write": %%d, "status": %%d, "timeout": %%d, "mean_us": %%f, "max_us": %%d, ' ..
    '"percentiles_us": {%%s}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency.mean, latency.max, table.concat(p, ", ")))
end
"""

_DELAY_FN = """
function delay()
  return delay_ms
end
"""


class WrkError(RuntimeError):
    """wrk is missing, could not be installed, or did not report."""


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run: how many requests, how fast, how slow, which errors."""

    connections: int
    threads: int
    duration_s: float
    requests: int
    rps: float
    latency_ms: dict[str, float]
    """Percentile ("50", "90", "99", "99.9") -> milliseconds."""
    mean_ms: float
    max_ms: float
    errors: dict[str, int] = field(default_factory=dict)
    delay_ms: int = 0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def p(self, percentile: float) -> float:
        return self.latency_ms[_key(percentile)]


def _key(percentile: float) -> str:
    return f"{percentile:g}"


def ensure_wrk() -> str:
    """Path of ``wrk``; installed with apt-get first when missing and running as root."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise WrkError("wrk is not installed: run `apt-get install -y wrk` (as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        done = subprocess.run(argv, env=env, capture_output=True, check=False, timeout=600)
        if done.returncode != 0:
            raise WrkError(f"{' '.join(argv)} failed: {done.stderr.decode(errors='replace')}")
    found = shutil.which("wrk")
    if not found:
        raise WrkError("apt-get installed wrk but it is not on PATH")
    return found


def write_script(
    path: Path, bodies: Path, *, url_path: str, delay_ms: int = 0, offset_step: int = 97
) -> Path:
    """Write the Lua script that posts ``bodies`` (one JSON per line) to ``url_path``."""
    path.write_text(
        _LUA
        % {
            "bodies": str(bodies.resolve()),
            "path": url_path,
            "delay_ms": delay_ms,
            "delay_fn": _DELAY_FN if delay_ms > 0 else "",
            "offset_step": offset_step,
            "percentiles": ", ".join(f"{q:g}" for q in PERCENTILES),
            "mark": _MARK,
        },
        encoding="utf-8",
    )
    return path


def parse_report(stdout: str, *, connections: int, threads: int, delay_ms: int = 0) -> WrkResult:
    """The `WrkResult` in wrk's output (the ``BENCH_JSON`` line ``done()`` prints)."""
    for line in stdout.splitlines():
        if line.startswith(_MARK):
            data = json.loads(line[len(_MARK) :])
            break
    else:
        raise WrkError(f"wrk printed no report:\n{stdout[-2000:]}")
    duration_s = data["duration_us"] / 1e6
    requests = int(data["requests"])
    return WrkResult(
        connections=connections,
        threads=threads,
        duration_s=round(duration_s, 3),
        requests=requests,
        rps=round(requests / duration_s, 1) if duration_s > 0 else 0.0,
        latency_ms={k: v / 1000 for k, v in data["percentiles_us"].items()},
        mean_ms=round(data["mean_us"] / 1000, 4),
        max_ms=data["max_us"] / 1000,
        errors={k: int(data[k]) for k in ("connect", "read", "write", "status", "timeout")},
        delay_ms=delay_ms,
    )


def wrk_argv(
    wrk: str, url: str, script: Path, *, connections: int, threads: int, duration_s: float
) -> list[str]:
    return [
        wrk, "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration_s))}s",
        "--timeout", "10s", "-s", str(script), url,
    ]  # fmt: skip


def run_wrk(
    wrk: str,
    url: str,
    script: Path,
    *,
    connections: int,
    duration_s: float,
    threads: int = 1,
    delay_ms: int = 0,
    extra_env: Sequence[tuple[str, str]] = (),
) -> WrkResult:
    """Run wrk once against ``url`` (its base; the script holds the path) and parse it."""
    threads = max(1, min(threads, connections))
    argv = wrk_argv(
        wrk, url, script, connections=connections, threads=threads, duration_s=duration_s
    )
    try:
        done = subprocess.run(
            argv, capture_output=True, check=False, timeout=duration_s + 60,
            env={**os.environ, **dict(extra_env)},
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise WrkError(f"wrk did not finish: {' '.join(argv)}") from exc
    stdout = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        raise WrkError(
            f"wrk exited {done.returncode}: {done.stderr.decode(errors='replace')}{stdout}"
        )
    return parse_report(stdout, connections=connections, threads=threads, delay_ms=delay_ms)


def rate_plan(
    rate: float, latency_ms: float, max_connections: int = 64, min_delay_ms: int = 10
) -> tuple[int, int]:
    """(connections, delay_ms) so that ``connections / (delay + latency)`` is about ``rate``.

    wrk's delay is in whole milliseconds, and its timers fire a little late: prefer delays of
    at least ``min_delay_ms``, so that neither that lateness nor a latency a bit off the
    estimate moves the rate much; take the fewest connections whose rounded delay lands
    within 3% of the rate, else the closest.
    """
    best: tuple[float, int, int] | None = None
    for floor in (min_delay_ms, 1):
        for connections in range(2, max_connections + 1):
            delay = connections * 1000.0 / rate - latency_ms
            if delay < floor:
                continue
            rounded = max(1, round(delay))
            error = abs(connections * 1000.0 / (rounded + latency_ms) - rate) / rate
            if error <= 0.03:
                return connections, rounded
            if best is None or error < best[0]:
                best = (error, connections, rounded)
    if best is None:
        return max_connections, 1
    return best[1], best[2]


# --- bodies ----------------------------------------------------------------------------------

_WORDS = (
    "cache prefix router worker tenant token block latency stream request policy ring "
    "load answer context system prompt model assistant user tool schema function value"
).split()


def _text(rng: random.Random, size: int) -> str:
    words: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(_WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:size]


def chat_bodies(count: int, size: int, seed: int, *, systems: int = 4) -> list[bytes]:
    """``count`` chat bodies of about ``size`` bytes: one of ``systems`` system prompts
    (~60%), three turns, and a question that differs on every body."""
    rng = random.Random(seed)
    heads = [_text(rng, int(size * 0.6)) for _ in range(systems)]
    bodies = []
    for i in range(count):
        messages = [
            {"role": "system", "content": heads[i % systems]},
            {"role": "user", "content": _text(rng, int(size * 0.1))},
            {"role": "assistant", "content": _text(rng, int(size * 0.1))},
            {"role": "user", "content": f"question {i}: " + _text(rng, int(size * 0.15))},
        ]
        body = {"model": "bench-model", "messages": messages, "max_tokens": 16}
        bodies.append(json.dumps(body, separators=(",", ":")).encode())
    return bodies
