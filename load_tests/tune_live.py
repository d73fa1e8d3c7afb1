"""``tune --verify-live``: the recommended settings, replayed live, against the prediction.

Starts ``cluster.workers`` real `prefix-worker sim` processes with the cluster's cache and
cost settings and one `prefix-router serve` with the recommended thresholds (everything else
on the router's defaults, as `load_tests.demo` runs it), drives the same trace through it
with `load_tests.client.run_trace`, and compares the cached-token ratio
(`load_tests.report.summarize_run`) with the tuner's prediction. Every process started is
stopped on the way out, whatever happens.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from load_tests import procs
from load_tests.client import RunOptions, run_trace
from load_tests.demo import ADMIN_TOKEN, ProcessSet, router_config, wait_until_routable
from load_tests.records import write_run
from load_tests.replay import ClusterSpec
from load_tests.report import summarize_run
from load_tests.workload import Trace
from router.core.model import Tuning

GOAL = 0.02
"""The live ratio must land within 2% (relative) of the predicted one."""


def sim_argv(worker: str, cluster: ClusterSpec, model: str) -> list[str]:
    return [
        *procs.console_script("prefix-worker"), "sim", "--port", "0", "--worker-id", worker,
        "--model", model, "--cache-blocks", str(cluster.cache_blocks),
        "--block-size", str(cluster.block_size),
        "--prefill-us-per-token", str(cluster.prefill_us_per_token),
        "--decode-ms-per-token", str(cluster.decode_ms_per_token),
        "--max-running", str(cluster.max_running),
        "--stream-interval-ms", str(cluster.stream_interval_ms),
    ]  # fmt: skip


def verify_live(
    trace: Trace,
    cluster: ClusterSpec,
    tuning: Tuning,
    *,
    predicted: float,
    out: Path,
    console: Console,
    concurrency: int = 256,
    start_timeout: float = 30.0,
) -> dict[str, Any]:
    """Run ``trace`` live with ``tuning``; the live and predicted ratios and their gap."""
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "live-logs"
    logs.mkdir(exist_ok=True)
    model = str(trace.requests[0].body.get("model") or "sim-model") if trace.requests else "m"
    ids = [f"w{i}" for i in range(cluster.workers)]
    scratch = Path(tempfile.mkdtemp(prefix="prefix-router-tune-"))
    began = time.monotonic()
    try:
        with ProcessSet(console) as processes:
            sims = processes.start_all(
                [(f"live/{w}", sim_argv(w, cluster, model), logs / f"{w}.log") for w in ids],
                start_timeout,
            )
            workers = [(w, sim.url) for w, sim in zip(ids, sims, strict=True)]
            config = router_config(workers, "cache_aware", trace.tenants)
            config["routing"].update(
                load_factor=tuning.load_factor,
                min_match_blocks=tuning.min_match_blocks,
                min_match_ratio=tuning.min_match_ratio,
                affinity_blocks=tuning.affinity_blocks,
                block_chars=cluster.block_chars,
            )
            config_path = scratch / "router.yaml"
            config_path.write_text(yaml.safe_dump(config))
            router_argv = [
                *procs.console_script("prefix-router"), "serve", "--config", str(config_path),
                "--port", "0",
            ]  # fmt: skip
            (router,) = processes.start_all(
                [("live/router", router_argv, logs / "router.log")], start_timeout
            )
            wait_until_routable(router.url, cluster.workers)
            options = RunOptions(
                concurrency=concurrency, admin_token=ADMIN_TOKEN, drain_timeout=30.0
            )
            run = asyncio.run(
                run_trace(trace.requests, router.url, label="live", options=options,
                          console=console)
            )  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_run(out / "live-run.jsonl.gz", run)
    summary = summarize_run(run)
    live = summary["cached_token_ratio"] or 0.0
    gap = abs(live - predicted) / predicted if predicted else float("inf")
    return {
        "predicted_ratio": round(predicted, 6),
        "live_ratio": round(live, 6),
        "relative_gap": round(gap, 6),
        "within_2pct": gap <= GOAL,
        "live_requests": summary["requests"],
        "live_errors": summary["errors"],
        "live_load_max_over_mean": summary["load_peak_mean_over_mean"],
        "live_ttft_ms": summary["ttft_ms"],
        "live_decisions": summary["decisions"],
        "elapsed_s": round(time.monotonic() - began, 1),
    }
