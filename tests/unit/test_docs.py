"""The README stays true to the code: every setting and metric is documented."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from router.config import Settings, WorkerSpec
from router.telemetry import Metrics, TelemetrySettings

README = (Path(__file__).parents[2] / "README.md").read_text()


def _setting_paths(model: type[BaseModel], prefix: str) -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths += _setting_paths(annotation, f"{prefix}{name}.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


def test_every_setting_is_in_the_readme() -> None:
    """Each field of the settings tree has a row in the README's settings table."""
    paths = [p for p in _setting_paths(Settings, "") if p not in ("workers", "tenants.api_keys")]
    paths += [f"workers[].{name}" for name in WorkerSpec.model_fields]
    paths.append("tenants.api_keys[]")
    missing = [p for p in paths if f"`{p}`" not in README]
    assert missing == []


def test_every_metric_is_in_the_readme() -> None:
    """Each exported metric family is named in the README (in full or as a `_suffix`)."""
    metrics = Metrics(TelemetrySettings())
    names = {family.name for family in metrics.registry.collect()}
    missing = [
        name
        for name in names
        if name not in README and "_" + name.removeprefix("prefix_router_") not in README
    ]
    assert missing == []
