"""``prefix-worker vllm`` without vLLM: the command line it builds, and how it supervises.

`build_command` is pure, so its flags and environment are checked directly. `supervise` is run
against a stand-in server (a few lines of Python that answer ``/health`` and exit with a known
code on SIGTERM), so readiness, signal forwarding and exit codes are tested in seconds.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

from load_tests.procs import ProcessStartError, spawn, start, wait_ready
from worker.vllm import VllmOptions, build_command, free_port, kv_events_topic

FAKE_VLLM = """
import http.server, signal, sys, threading
port, exit_code, healthy = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if healthy and self.path == "/health" else 503)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", port), Health)
signal.signal(signal.SIGTERM, lambda *a: (threading.Thread(target=server.shutdown).start()))
print("fake vllm log line on stdout", flush=True)
if exit_code >= 100:
    sys.exit(exit_code - 100)  # dies before it is healthy
server.serve_forever()
sys.exit(exit_code)
"""


def options(**overrides: object) -> VllmOptions:
    values: dict[str, object] = {"model": "/models/m", "port": 8100, "worker_id": "w1"}
    values.update(overrides)
    return VllmOptions(**values)  # type: ignore[arg-type]


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_command_runs_the_openai_server_module_with_caching_flags() -> None:
    """vLLM runs as its OpenAI server module with prefix caching and token details on."""
    argv, _ = build_command(options(python="/venv/bin/python", block_size=32), {})
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert "--enable-prefix-caching" in argv
    assert "--enable-prompt-tokens-details" in argv
    assert flag(argv, "--block-size") == "32"
    assert flag(argv, "--prefix-caching-hash-algo") == "sha256"
    assert flag(argv, "--port") == "8100"
    assert flag(argv, "--host") == "127.0.0.1"
    assert flag(argv, "--served-model-name") == "/models/m"
    assert "--kv-events-config" not in argv
    assert "--kv-cache-memory-bytes" not in argv


def test_kv_events_config_names_endpoint_and_per_worker_topic() -> None:
    """With an endpoint, vLLM publishes KV events over ZMQ on the worker's own topic."""
    argv, _ = build_command(
        options(kv_events_endpoint="tcp://*:5557", kv_events_replay_endpoint="tcp://*:5558"), {}
    )
    config = json.loads(flag(argv, "--kv-events-config"))
    assert config == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://*:5557",
        "topic": kv_events_topic("w1"),
        "replay_endpoint": "tcp://*:5558",
    }
    assert kv_events_topic("w1") != kv_events_topic("w2")


def test_extra_args_come_last_and_served_name_and_cache_size_pass_through() -> None:
    """Operator flags after ``--`` reach vLLM unchanged, after the launcher's own."""
    argv, _ = build_command(
        options(
            served_model_name="llama",
            kv_cache_memory_bytes=1 << 30,
            extra_args=("--tensor-parallel-size", "2"),
        ),
        {},
    )
    assert argv[-2:] == ["--tensor-parallel-size", "2"]
    assert flag(argv, "--served-model-name") == "llama"
    assert flag(argv, "--kv-cache-memory-bytes") == str(1 << 30)


def test_hash_seed_sets_pythonhashseed_and_no_seed_clears_it() -> None:
    """vLLM's root hash comes from --hash-seed, never from an inherited PYTHONHASHSEED."""
    base = {"PYTHONHASHSEED": "123", "PATH": "/bin"}
    _, seeded = build_command(options(hash_seed="7"), base)
    _, unseeded = build_command(options(), base)
    assert seeded["PYTHONHASHSEED"] == "7"
    assert "PYTHONHASHSEED" not in unseeded
    assert seeded["PATH"] == unseeded["PATH"] == "/bin"
    assert seeded["VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES"] == "1"
    assert base["PYTHONHASHSEED"] == "123"  # the caller's mapping is not modified


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hash_seed": "vllm-none-hash"}, "integer"),
        ({"hash_seed": "4294967296"}, "integer"),
        ({"hash_algo": "xxhash"}, "random root"),
        ({"hash_algo": "md5"}, "one of"),
        ({"port": 0}, "port"),
        ({"block_size": 0}, "block size"),
        ({"kv_cache_memory_bytes": 0}, "positive"),
    ],
)
def test_invalid_options_are_refused(overrides: dict[str, object], message: str) -> None:
    """Settings that would start a vLLM the router cannot match are refused up front."""
    with pytest.raises(ValueError, match=message):
        options(**overrides)


def launcher_argv(tmp_path: Path, port: int, exit_code: int, healthy: bool = True) -> list[str]:
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_VLLM)
    # The stand-in ignores vLLM's flags; `--python` makes the launcher run it instead of vLLM,
    # and `-c` turns "-m vllm.entrypoints..." into arguments of a tiny wrapper.
    wrapper = tmp_path / "python"
    wrapper.write_text(
        f"#!/bin/sh\nexec {sys.executable} {script} {port} {exit_code} {int(healthy)}\n"
    )
    wrapper.chmod(0o755)
    return [
        sys.executable, "-m", "worker.vllm", "--model", "m", "--worker-id", "w1",
        "--port", str(port), "--python", str(wrapper), "--startup-timeout", "20",
    ]  # fmt: skip


def test_ready_line_after_health_and_sigterm_exit_code_forwarded(tmp_path: Path) -> None:
    """The launcher announces readiness once /health answers, and exits with vLLM's code."""
    port = free_port("127.0.0.1")
    server = start(
        "launcher", launcher_argv(tmp_path, port, exit_code=3), log_path=tmp_path / "log"
    )
    assert server.url == f"http://127.0.0.1:{port}"
    server.popen.send_signal(signal.SIGTERM)  # the launcher alone, not its process group
    assert server.popen.wait(timeout=20) == 3
    server.stop()
    assert "fake vllm log line" in (tmp_path / "log").read_text()


def start_failing(argv: list[str], log_path: Path | None = None) -> ProcessStartError:
    """Start a launcher that must fail before its ready line; the error it failed with."""
    popen = spawn(argv, log_path=log_path)
    try:
        wait_ready("launcher", popen, timeout=20, log_path=log_path)
    except ProcessStartError as exc:
        return exc
    finally:
        assert popen.stdout is not None
        popen.stdout.close()  # wait_ready leaves the pipe open when the process fails
        popen.wait(timeout=20)
    raise AssertionError("the launcher printed a ready line")


def test_vllm_dying_before_ready_is_reported_with_its_code(tmp_path: Path) -> None:
    """If vLLM exits during startup, no ready line is printed and its exit code is kept."""
    port = free_port("127.0.0.1")
    error = start_failing(launcher_argv(tmp_path, port, exit_code=104))
    assert "exited with code 4" in str(error)


def test_never_healthy_vllm_is_stopped_at_the_startup_deadline(tmp_path: Path) -> None:
    """A vLLM that never becomes healthy is terminated after --startup-timeout."""
    port = free_port("127.0.0.1")
    argv = launcher_argv(tmp_path, port, exit_code=0, healthy=False)
    argv[-1] = "1"
    error = start_failing(argv, log_path=tmp_path / "log")
    assert "exited with code 0" in str(error)
    assert "/health not ready" in (tmp_path / "log").read_text()
