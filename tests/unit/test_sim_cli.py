"""``prefix-worker sim`` parses its options with the documented defaults."""

from __future__ import annotations

import pytest

from worker.cli import build_parser, main


def test_sim_defaults_are_the_documented_ones() -> None:
    """Only --worker-id is needed; host, model, cache geometry and timings have defaults."""
    args = build_parser().parse_args(["sim", "--worker-id", "w1", "--port", "0"])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 0, "sim-model")
    assert (args.cache_blocks, args.block_size, args.max_running) == (2048, 16, 256)
    assert (args.prefill_us_per_token, args.decode_ms_per_token) == (20.0, 1.5)
    assert args.no_prompt_tokens_details is False


def test_a_worker_id_is_required() -> None:
    """Without --worker-id the command refuses to start."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["sim"])
    assert exited.value.code == 2


def test_an_impossible_configuration_exits_with_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A max-model-len larger than the cache is refused before binding, as vLLM refuses it."""
    assert main(["sim", "--worker-id", "w", "--cache-blocks", "4", "--max-model-len", "100"]) == 2
    assert "does not fit in the KV cache" in capsys.readouterr().err
