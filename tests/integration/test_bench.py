"""The router overhead benchmark at tiny scale, and `prefix-router serve --processes N`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from rich.console import Console

from load_tests import bench_sys, procs
from load_tests.bench import BenchConfig, run_bench
from load_tests.redis_server import RedisServer

needs_wrk = pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (apt-get install -y wrk)"
)


@pytest.fixture
def instant_worker(tmp_path: Path) -> Iterator[procs.ServerProcess]:
    argv = [*procs.console_script("prefix-worker")[:1], "-m", "load_tests.bench_worker",
            "--port", "0", "--worker-id", "w0"]  # fmt: skip
    worker = procs.start("worker", argv, log_path=tmp_path / "worker.log")
    yield worker
    worker.stop()


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in pids if os.path.exists(f"/proc/{pid}") and not _zombie(pid)]
        time.sleep(0.05)  # polling with a deadline
    return alive


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


@needs_wrk
def test_bench_smoke_writes_sane_figures(tmp_path: Path) -> None:
    """A 1 s-per-point run measures direct and our router and writes bench.json and bench.md."""
    config = BenchConfig(
        out=tmp_path / "bench", duration=1.0, warmup=0.5, processes=(1,), peers=(),
        bare=False, bodies=64,
    )  # fmt: skip
    with open(os.devnull, "w") as devnull:
        result = run_bench(config, Console(width=140, file=devnull))
    saved = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert saved["errors_total"] == 0 == result["errors_total"]
    names = [t["name"] for t in saved["targets"]]
    assert names == ["direct", "ours-1p"]
    for target in saved["targets"]:
        assert set(target["points"]) == {"c1", "c64", "half_peak"}
        for point in target["points"].values():
            assert point["requests"] > 0
            assert point["error_count"] == 0
    ours = saved["targets"][1]
    assert ours["points"]["c64"]["cpu_s"] > 0
    assert ours["points"]["c64"]["rps_per_cpu_s"] > 0
    assert ours["points"]["c1"]["added_ms"]["50"] is not None
    assert saved["meta"]["machine"]["cpu_count"] >= 1
    report = (tmp_path / "bench" / "bench.md").read_text()
    assert "| ours-1p | half_peak |" in report
    assert "no peer router measured" in report


def _two_processes(
    worker: procs.ServerProcess, tmp_path: Path, *options: str
) -> procs.ServerProcess:
    """``prefix-router serve --processes 2 [options]`` in front of ``worker``, started."""
    argv = [*procs.console_script("prefix-router"), "serve", "--worker", worker.url,
            "--port", "0", "--processes", "2", *options]  # fmt: skip
    return procs.start("router", argv, log_path=tmp_path / "router.log", timeout=60)


def test_processes_share_one_port_and_stop_together(
    instant_worker: procs.ServerProcess, tmp_path: Path
) -> None:
    """`serve --processes 2` prints one listening line; two PIDs listen; SIGTERM stops all."""
    router = _two_processes(instant_worker, tmp_path)
    try:
        port = int(router.url.rsplit(":", 1)[1])
        listeners = bench_sys.listening_pids(port)
        children = bench_sys.descendants(router.pid)
        assert len(listeners) == 2
        assert router.pid not in listeners
        assert set(listeners) <= set(children)
        os.kill(router.pid, signal.SIGTERM)
        assert router.popen.wait(timeout=30) == 0
        assert router.popen.stdout is not None
        assert b"listening" not in router.popen.stdout.read()
        assert _wait_gone(listeners, 10) == []
    finally:
        router.stop()


def test_a_dead_process_stops_the_others(
    instant_worker: procs.ServerProcess, tmp_path: Path
) -> None:
    """When one of the --processes dies on its own, the rest are stopped and serve exits 1."""
    router = _two_processes(instant_worker, tmp_path)
    try:
        listeners = bench_sys.listening_pids(int(router.url.rsplit(":", 1)[1]))
        assert len(listeners) == 2
        os.kill(listeners[0], signal.SIGKILL)
        assert router.popen.wait(timeout=30) == 1
        assert _wait_gone(listeners, 10) == []
        assert "exited on its own" in (tmp_path / "router.log").read_text()
    finally:
        router.stop()


def test_a_live_change_reaches_every_process_through_redis(
    instant_worker: procs.ServerProcess, tmp_path: Path, redis_server: RedisServer
) -> None:
    """One PUT /admin/config lands on one of the --processes; with Redis, both run it."""
    config = tmp_path / "router.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"admin_token": "t", "admin_on_public_port": True},
                "loads": {"kind": "redis"},
                "redis": {"url": redis_server.url, "tuning_poll_s": 0.05},
            }
        )
    )
    router = _two_processes(instant_worker, tmp_path, "--config", str(config))
    admin = {"Authorization": "Bearer t"}
    try:
        put = httpx.put(router.url + "/admin/config", json={"load_factor": 2.0}, headers=admin)
        assert put.status_code == 200, put.text
        # A new connection per call: the kernel spreads them over both processes.
        seen: dict[str, tuple[int, float]] = {}
        deadline = time.monotonic() + 20
        while len(seen) < 2 or any(v != (1, 2.0) for v in seen.values()):
            assert time.monotonic() < deadline, f"processes seen: {seen}"
            config_now = httpx.get(router.url + "/admin/config", headers=admin).json()
            sharing = config_now["shared_tuning"]
            seen[sharing["replica"]] = (sharing["version"], config_now["tuning"]["load_factor"])
    finally:
        router.stop()
