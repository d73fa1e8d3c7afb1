"""The prompt-shape scenario generator: seeded, and shaped as its options say."""

from __future__ import annotations

import json

import pytest

from load_tests.shapes import ShapeConfig, rollout_config, shape_trace


def _dump(config: ShapeConfig) -> str:
    return json.dumps([r.to_json() for r in shape_trace(config).requests])


def test_the_same_config_gives_the_same_trace() -> None:
    """A seed fixes every byte; another seed changes the ids."""
    config = ShapeConfig(requests=12, head_tokens=300)
    assert _dump(config) == _dump(config)
    assert _dump(config) != _dump(ShapeConfig(requests=12, head_tokens=300, seed=1))


def test_the_bad_route_puts_the_id_first_until_it_is_moved() -> None:
    """Route 'bad' opens with the request line; with id_position='end' it ends with it, like
    route 'good' always does; the head text is the same either way."""
    start = shape_trace(ShapeConfig(requests=4, head_tokens=300))
    end = shape_trace(ShapeConfig(requests=4, head_tokens=300, id_position="end"))
    for before, after in zip(start.requests, end.requests, strict=True):
        route = before.headers["x-prefix-router-route"]
        system, user = (m["content"] for m in before.body["messages"])
        moved_system, moved_user = (m["content"] for m in after.body["messages"])
        line = (system if route == "bad" else user).split("\n\n")[0]
        assert line.startswith("Request ")
        assert moved_user.startswith(line)
        assert moved_system == (system.split("\n\n", 1)[1] if route == "bad" else system)


def test_the_rollout_route_changes_version_mid_run() -> None:
    """The rollout route sends v1 for its first half and v2 after, in x-prefix-version, with
    a different head; other routes stay at v1."""
    trace = shape_trace(rollout_config(requests=12, head_tokens=300))
    versions = [
        (r.headers["x-prefix-router-route"], r.headers["x-prefix-version"]) for r in trace.requests
    ]
    assert [v for route, v in versions if route == "rollout"] == ["v1", "v1", "v2", "v2"]
    assert {v for route, v in versions if route != "rollout"} == {"v1"}
    heads = {r.body["messages"][0]["content"] for r in trace.requests if r.prefix_version == 2}
    assert all(head.startswith("Prompt policy v2") for head in heads)


def test_unknown_routes_are_refused() -> None:
    """Naming a bad or rollout route that is not among the routes is an error."""
    with pytest.raises(ValueError, match="unknown routes"):
        ShapeConfig(routes=("a",), bad_routes=("b",))
