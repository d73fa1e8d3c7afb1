"""Live thresholds shared by every router replica through Redis.

Behind a Service, ``PUT /admin/config`` reaches one replica (one process under
``--processes``). With Redis in use (`Settings.shares_tuning`), that replica writes the whole
new `Tuning` to one Redis hash, ``{prefix}:tuning``, under a version number, and every
replica polls the hash every ``redis.tuning_poll_s`` and takes a newer version. So the
fleet converges within one poll interval, and a replica that starts later (a scale-out, a
restarted pod) takes the live values too.

The record::

    version  1, 2, ...: raised by each change (compare-and-set, so two changes made at once
             on two replicas are applied one after the other, neither lost); a replica takes
             any version other than its own, since a lost record starts again at 1
    tuning   the complete thresholds, JSON
    base     the settings-file thresholds of the replica that made the change, JSON
    by, at   that replica's id, and the Unix time of the change

``base`` settles one conflict: the file and a live experiment disagree. A replica that starts
takes the record only when its own file values equal the record's ``base``: when the file has
changed since the experiment (a ConfigMap edit rolled out), the file wins, and the record is
taken again from its next change on. Records written by a newer router with fields this one
does not know are applied for the fields it knows.

Fail-open, as everything on Redis: a replica that cannot read the record keeps its values and
retries at the next poll; a change that cannot be written is refused (503) and made nowhere.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis

from router.config import TuningState
from router.core.model import Tuning
from router.errors import TuningNotShared
from router.index.redis import FAILURES, LuaScript, redis_client
from router.tasks import cancel_and_wait

log = logging.getLogger("prefix_router.tuning")

PUBLISH = """
local key, expected = ARGV[1], tonumber(ARGV[2])
local current = tonumber(redis.call('HGET', key, 'version') or '0') or 0
if current ~= expected then
  return {0, current}
end
redis.call('HSET', key, 'version', current + 1, 'tuning', ARGV[3], 'base', ARGV[4],
           'by', ARGV[5], 'at', ARGV[6])
return {1, current + 1}
"""
"""Compare-and-set: write the record when its version is still the one the writer read."""

_ATTEMPTS = 5
"""Changes raced by others on other replicas before giving up (each retry re-reads)."""


@dataclass(frozen=True, slots=True)
class TuningRecord:
    version: int
    tuning: dict[str, Any]
    base: dict[str, Any]
    by: str


class SharedTuning:
    """This replica's side of the shared thresholds: the change it makes, the ones it takes."""

    def __init__(
        self,
        url: str,
        tuning: TuningState,
        base: Callable[[], Tuning],
        *,
        replica_id: str,
        prefix: str = "pr",
        poll_interval_s: float = 1.0,
        op_timeout_s: float = 0.25,
        on_version: Callable[[int], None] | None = None,
    ) -> None:
        """``base`` answers the settings file's thresholds as last loaded (a reload changes
        them); ``on_version`` is told each version this replica runs (a metric)."""
        self._url = url
        self._tuning = tuning
        self._base = base
        self.replica_id = replica_id
        self._key = "{" + prefix + "}:tuning"
        self._interval = poll_interval_s
        self._op_timeout = op_timeout_s
        self._on_version = on_version
        self._publish = LuaScript(PUBLISH)
        self._client: aioredis.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self.version = 0
        """The record version this replica runs, or has decided not to take (0: none seen)."""
        self._synced = False
        """True once a read succeeded: the first one decides by ``base``, the later ones by
        version alone."""
        self._reachable = True
        self._writes = 0
        """Changes made here; a read that a change overtook is not taken."""
        self._fleet: Tuning | None = None
        """What this replica runs without a ``scope=replica`` override: the fleet's thresholds
        as last taken or written here, with what reloads of the file changed since. A change
        is merged onto them, so an override does not spread with it, and a file edit does
        not get undone by it."""

    # lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Read the record once (never fails if Redis is down), then poll in the background."""
        self._client = redis_client(self._url, op_timeout_s=self._op_timeout, max_connections=2)
        await self.sync()
        self._task = asyncio.create_task(self._poll_forever(), name="shared-tuning")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.sync()

    def file_changed(self, changes: Mapping[str, Any]) -> None:
        """A reload applied thresholds the settings file changed (`router.reload`)."""
        if self._fleet is not None:
            self._fleet = self._tuning.merged(changes, onto=self._fleet)

    # reading -----------------------------------------------------------------------------
    async def sync(self) -> bool:
        """Read the record and take it if its version is not the one running here (on the
        first read, only if it was made against this replica's file values). False, without
        raising, when Redis fails.

        A version that differs is newer, or the record was lost (Redis restarted without
        persistence, or was flushed) and made again from version 1: either way it is the
        fleet's latest change."""
        writes = self._writes
        try:
            record = await self._read()
        except FAILURES as exc:
            if self._reachable:
                log.warning("shared tuning: Redis unreachable (%r); running values kept", exc)
            self._reachable = False
            return False
        if not self._reachable:
            log.info("shared tuning: Redis reachable again")
        self._reachable = True
        if self._writes != writes:
            return True  # a change was made here while reading: this read is older than it
        first, self._synced = not self._synced, True
        if record is None:
            if self.version:
                log.warning(
                    "shared tuning: the fleet's record is gone (Redis restarted or flushed); "
                    "running values kept, the next change starts again at version 1"
                )
                self._set_version(0)
                self._fleet = None
            return True
        if record.version == self.version:
            return True
        if first and record.base != asdict(self._base()):
            log.warning(
                "shared tuning: the fleet's live thresholds (version %d, set by %s) were made "
                "against other settings-file values; this replica keeps its file's until the "
                "next PUT /admin/config",
                record.version, record.by,
            )  # fmt: skip
        else:
            self._take(record)
        self._set_version(record.version)
        return True

    def _take(self, record: TuningRecord) -> None:
        if not record.tuning:
            return
        known = set(Tuning.__dataclass_fields__)
        unknown = sorted(set(record.tuning) - known)
        try:
            applied = self._tuning.update({k: v for k, v in record.tuning.items() if k in known})
        except ValueError as exc:
            log.error("shared tuning: version %d invalid here (%s); ignored", record.version, exc)
            return
        self._fleet = applied
        log.info(
            "shared tuning: took version %d (set by %s)", record.version, record.by,
            extra={"fields": {"tuning": asdict(applied), "ignored_fields": unknown}},
        )  # fmt: skip

    async def _read(self) -> TuningRecord | None:
        client = self._connected()
        async with asyncio.timeout(self._op_timeout):
            raw = await client.hmget(self._key, ["version", "tuning", "base", "by"])
        if raw[0] is None:
            return None
        try:
            version = int(raw[0])
        except ValueError:
            log.error(
                "shared tuning: unreadable version at %s; the next change replaces it", self._key
            )
            return None
        try:
            tuning, base = _object(raw[1]), _object(raw[2])
        except ValueError as exc:
            # Kept as a version with nothing to take, so the next change replaces it.
            log.error("shared tuning: unreadable version %d at %s (%s)", version, self._key, exc)
            tuning, base = {}, {}
        return TuningRecord(version, tuning, base, _text(raw[3]) or "?")

    # writing -----------------------------------------------------------------------------
    async def change(self, changes: Mapping[str, Any]) -> Tuning:
        """Apply ``changes`` on every replica: validate (ValueError names a bad field), write
        the merged thresholds to Redis, and run them here at once. The others take them at
        their next poll. Raises `TuningNotShared` when Redis cannot take the change; nothing
        changed then, here or elsewhere."""
        self._tuning.merged(changes)  # a bad field is refused before any Redis call
        for _ in range(_ATTEMPTS):
            # Merge onto the fleet's latest values, not a stale copy of them.
            if not await self.sync():
                raise TuningNotShared(
                    "could not reach Redis to share the change with the other replicas; "
                    "nothing changed (retry, or PUT /admin/config?scope=replica for this "
                    "replica alone)"
                )
            new = self._tuning.merged(changes, onto=self._fleet)
            try:
                written, version = await self._write(new)
            except TimeoutError:
                # The script may have run after all: then every replica, this one included,
                # takes the change at its next poll.
                raise TuningNotShared(
                    "Redis did not confirm the change in time: it was made on every replica "
                    "or on none; GET /admin/config after redis.tuning_poll_s tells which"
                ) from None
            except FAILURES as exc:
                raise TuningNotShared(
                    f"could not write the change to Redis ({exc!r}); nothing changed"
                ) from None
            if written:
                self._writes += 1
                self._fleet = self._tuning.set(new)
                self._set_version(version)
                log.info(
                    "shared tuning: set version %d for every replica", version,
                    extra={"fields": {"tuning": asdict(new)}},
                )  # fmt: skip
                return new
        raise TuningNotShared(
            f"the thresholds changed {_ATTEMPTS} times on other replicas while this change was "
            "being made; nothing changed, retry"
        )

    async def _write(self, tuning: Tuning) -> tuple[bool, int]:
        client = self._connected()
        args = (
            self._key,
            str(self.version),
            json.dumps(asdict(tuning), sort_keys=True),
            json.dumps(asdict(self._base()), sort_keys=True),
            self.replica_id,
            f"{time.time():.3f}",
        )
        async with asyncio.timeout(self._op_timeout):
            written, version = await self._publish.run(client, *args)
        return bool(written), int(version)

    # helpers -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """For ``GET /admin/config``."""
        return {
            "scope": "fleet",
            "version": self.version,
            "redis_reachable": self._reachable,
            "replica": self.replica_id,
        }

    def _set_version(self, version: int) -> None:
        self.version = version
        if self._on_version is not None:
            self._on_version(version)

    def _connected(self) -> aioredis.Redis:
        if self._client is None:
            raise RuntimeError("SharedTuning used before start()")
        return self._client


def _text(raw: bytes | str | None) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else raw or ""


def _object(raw: bytes | str | None) -> dict[str, Any]:
    value = json.loads(raw or "{}")
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value
