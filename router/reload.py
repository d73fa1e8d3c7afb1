"""Settings reload (SIGHUP, ``POST /admin/reload``): validate the whole tree, then apply what
can change live.

A reload builds a complete new `Settings` from the same sources as at start (the file, the
environment, the same command-line flags). If that fails, nothing changes: the running
settings stay, the error is logged and counted. Otherwise every changed field is either

- **live**: applied at once, without dropping a request (the table `LIVE` below): the
  routing thresholds and policy, the static `workers` list, everything under `tenants` (API
  keys, salt secret), the admin token, decision headers, route and prefix-version headers,
  the shutdown grace, the upstream API key, the log level and the access log; or
- **restart-required**: everything else (ports, index and load kinds, Redis, hasher and ring
  shape, discovery, timeouts, health thresholds, log format, label limit). Such a field keeps
  its running value; the log names it, ``/admin/config`` shows the running value, and the
  ``prefix_router_reload_restart_required`` gauge stays at 1 until a restart.

The routing thresholds are applied only when the file's value changed since the last
load, so a reload for another reason (a new API key) does not undo a live adjustment made
through ``PUT /admin/config``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ValidationError

from router.config import ConfigError, Settings
from router.core.model import Tuning
from router.core.policies import make_policy
from router.tenants import TenantResolver

if TYPE_CHECKING:
    from router.state import RouterState

log = logging.getLogger("prefix_router.reload")

SettingsLoader = Callable[[], Settings]
"""Builds the settings again from their sources; raises `ConfigError` when they are invalid."""

LIVE: dict[str, frozenset[str] | None] = {
    "server": frozenset(
        {
            "admin_token",
            "decision_headers",
            "route_header",
            "prefix_version_header",
            "shutdown_grace_s",
        }
    ),  # fmt: skip
    "workers": None,
    "routing": frozenset(
        {
            "policy",
            "load_factor",
            "load_floor",
            "affinity_choices",
            "min_match_blocks",
            "min_match_ratio",
            "affinity_blocks",
        }
    ),
    "tenants": None,
    "upstream": frozenset({"api_key"}),
    "telemetry": frozenset({"log_level", "access_log"}),
}
"""Fields a reload applies at once; ``None``: the whole section. Any other field needs a
restart."""

STATIC_SOURCE = "static"
_TUNING_FIELDS = frozenset(Tuning.__dataclass_fields__)

Outcome = Literal["applied", "unchanged", "rejected"]


@dataclass(frozen=True, slots=True)
class ReloadResult:
    result: Outcome
    applied: list[str] = field(default_factory=list)
    """Changed fields now in effect (``section.field``)."""
    restart_required: list[str] = field(default_factory=list)
    """Changed fields that keep their running value until a restart."""
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "applied": self.applied,
            "restart_required": self.restart_required,
            "error": self.error,
        }


def changed_fields(old: Settings, new: Settings) -> list[str]:
    """Every field that differs, as ``section.field`` (``workers`` as a whole)."""
    paths: list[str] = []
    for section in Settings.model_fields:
        before, after = getattr(old, section), getattr(new, section)
        if isinstance(before, BaseModel):
            paths += [
                f"{section}.{name}"
                for name in type(before).model_fields
                if getattr(before, name) != getattr(after, name)
            ]
        elif before != after:
            paths.append(section)
    return paths


def is_live(path: str) -> bool:
    section, _, name = path.partition(".")
    if section not in LIVE:
        return False
    names = LIVE[section]
    return names is None or name in names


def with_live_fields(running: Settings, new: Settings, paths: list[str]) -> Settings:
    """``running`` with the live ``paths`` taken from ``new``, validated as a whole."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for path in paths:
        section, _, name = path.partition(".")
        if name:
            sections.setdefault(section, {})[name] = getattr(getattr(new, section), name)
        else:
            top[section] = getattr(new, section)
    for section, updates in sections.items():
        top[section] = getattr(running, section).model_copy(update=updates)
    merged = running.model_copy(update=top)
    return Settings.model_validate(merged.model_dump())


class Reloader:
    """Runs reloads one at a time against one app's state."""

    def __init__(self, state: RouterState, loader: SettingsLoader | None) -> None:
        self._state = state
        self._loader = loader
        self._lock = asyncio.Lock()
        self._wanted = asyncio.Event()
        self._wanted_source = "sighup"
        self.last: ReloadResult | None = None
        """The outcome of the latest reload (``GET /admin/config`` shows it)."""

    @property
    def available(self) -> bool:
        """False for an app built from a `Settings` value alone (nothing to read again)."""
        return self._loader is not None

    def request(self, source: str = "sighup") -> None:
        """Ask for a reload from a signal handler; `run_forever` carries it out."""
        self._wanted_source = source
        self._wanted.set()

    async def run_forever(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            await self.reload(self._wanted_source)

    async def reload(self, source: str) -> ReloadResult:
        async with self._lock:
            result = await self._reload()
        self.last = result
        metrics = self._state.metrics
        metrics.reloads.labels(source, result.result).inc()
        if result.result != "rejected":
            metrics.reload_restart_required.set(1 if result.restart_required else 0)
        return result

    async def _reload(self) -> ReloadResult:
        if self._loader is None:
            return ReloadResult("rejected", error="no settings source to read again")
        try:
            new = await asyncio.to_thread(self._loader)
        except ConfigError as exc:
            log.error(
                "settings reload rejected; the running settings stay",
                extra={"fields": {"error": str(exc)}},
            )
            return ReloadResult("rejected", error=str(exc))
        state = self._state
        running = state.settings
        paths = changed_fields(running, new)
        live = [p for p in paths if is_live(p)]
        restart = [p for p in paths if not is_live(p)]
        try:
            effective = with_live_fields(running, new, live)
        except ValidationError as exc:
            error = f"the new settings do not combine with the running ones: {exc.error_count()}"
            log.error("settings reload rejected; the running settings stay",
                      extra={"fields": {"error": error}})  # fmt: skip
            return ReloadResult("rejected", error=error)
        await self._apply(running, effective, live)
        if restart:
            log.warning(
                "settings changed that take effect only after a restart; running values kept",
                extra={"fields": {"restart_required": restart}},
            )
        if live:
            log.info("settings reloaded", extra={"fields": {"applied": live}})
        return ReloadResult("applied" if live else "unchanged", live, restart)

    async def _apply(self, running: Settings, effective: Settings, live: list[str]) -> None:
        state = self._state
        sections = {p.partition(".")[0] for p in live}
        state.settings = effective
        if "tenants" in sections:
            state.tenants = TenantResolver(effective.tenants)
        if "routing.policy" in live:
            state.router.policy = make_policy(effective.routing.policy)
        tuning = {
            name: getattr(effective.routing, name)
            for name in _TUNING_FIELDS
            if f"routing.{name}" in live
        }
        if tuning:
            state.tuning.update(tuning)
            if state.shared_tuning is not None:
                state.shared_tuning.file_changed(tuning)
        if "server.decision_headers" in live:
            state.forwarder.headers_on = effective.server.decision_headers
        if "telemetry.log_level" in live:
            logging.getLogger("prefix_router").setLevel(effective.telemetry.log_level.upper())
        if "workers" in sections:
            added, removed = await state.membership.sync(STATIC_SOURCE, effective.workers)
            if added or removed:
                log.info("static workers changed",
                         extra={"fields": {"added": added, "removed": removed}})  # fmt: skip
