"""Who is calling: API key -> tenant, and the tenant's `cache_salt`.

API keys are kept only as SHA-256 digests and looked up by digest, so the process never holds a
key it could leak and a lookup's timing says nothing about how close a wrong key came. The
tenant never comes from a field the client chooses, unless an operator turns on
`trust_tenant_header` for an ingress that sets (and strips) that header itself.

``cache_salt = HMAC-SHA256(salt_secret, tenant)``: vLLM folds it into the first block's hash, so
the engine itself keeps tenants' KV blocks apart, and no client can compute another tenant's
salt. The secret must be the same on every replica and survive restarts, or the replicas would
split the cache and each restart would empty it.

`TenantGate` admits each tenant's inference requests while they stay under
``tenants.max_concurrent_per_tenant``, so one tenant cannot take every worker slot. It counts on
the router's load board: with ``loads.kind: local`` per replica, with no network; with
``loads.kind: redis`` for the whole fleet, exactly, by one atomic Redis step per admission
(router/loads.py), falling back to an estimate from the counts last published when Redis fails
or is slow (docs/reliability.md). The limit is read per request, so a reload changes it at
once, and the counts survive the reload.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from collections.abc import Mapping

from router.config import TenantSettings
from router.errors import Unauthorized
from router.loads import Admission, LocalLoadBoard, TenantLoads, TenantScope

DEV_SALT_SECRET = b"prefix-router-development-salt-secret"
_MAX_TENANT_HEADER = 256

log = logging.getLogger("prefix_router.tenants")


class TenantResolver:
    """Maps request headers to a tenant and a tenant to its cache salt."""

    def __init__(self, settings: TenantSettings) -> None:
        self._by_digest: dict[str, str] = {k.digest(): k.tenant for k in settings.api_keys}
        self._trust_header = settings.trust_tenant_header
        self._header = settings.tenant_header
        self._default = settings.default_tenant
        if settings.salt_secret is None:
            log.warning(
                "no tenants.salt_secret configured: using the fixed development secret; "
                "set one shared secret for all replicas in production"
            )
            self._secret = DEV_SALT_SECRET
        else:
            self._secret = settings.salt_secret.get_secret_value().encode()
        if not self._by_digest and not self._trust_header:
            log.warning(
                "no API keys configured: authentication is off and every client is tenant %r",
                self._default,
            )
        self._salts: dict[str, str] = {}

    @property
    def auth_enabled(self) -> bool:
        return bool(self._by_digest)

    def resolve(self, headers: Mapping[str, str]) -> str:
        """The tenant of a request, or `Unauthorized` with a message the client can act on."""
        if self._trust_header:
            tenant = headers.get(self._header, "").strip()
            if not tenant:
                raise Unauthorized(f"missing {self._header} header (set by the ingress)")
            if len(tenant) > _MAX_TENANT_HEADER or not tenant.isprintable():
                raise Unauthorized(f"invalid {self._header} header")
            return tenant
        if not self._by_digest:
            return self._default
        key = _bearer(headers)
        if key is None:
            raise Unauthorized(
                "missing API key: send 'Authorization: Bearer <key>'", param="authorization"
            )
        # aiohttp decodes header bytes that are not UTF-8 as lone surrogates; hash the bytes
        # the client sent, so such a key is simply wrong (401), not a crash (500).
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
        known = self._by_digest.get(digest)
        if known is None:
            raise Unauthorized("incorrect API key provided", param="authorization")
        return known

    def cache_salt(self, tenant: str) -> str:
        cached = self._salts.get(tenant)
        if cached is not None:
            return cached
        mac = hmac.new(self._secret, tenant.encode(), hashlib.sha256).digest()
        salt = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
        if len(self._salts) < 100_000:
            self._salts[tenant] = salt
        return salt


def _bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("Authorization") or headers.get("authorization")
    if value is not None:
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    api_key = headers.get("x-api-key")
    return api_key.strip() if api_key else None


class TenantGate:
    """Per-tenant admission against a limit given at each `enter`, on a board's tenant counts."""

    __slots__ = ("_loads",)

    def __init__(self, loads: TenantLoads | None = None) -> None:
        self._loads: TenantLoads = loads if loads is not None else LocalLoadBoard()

    async def enter(self, tenant: str, limit: int | None) -> Admission:
        """Count one more request for ``tenant`` unless its requests in flight (across the
        fleet when the board shares them) are already at ``limit``; nothing is counted on
        refusal. Never raises for Redis: see `Admission.basis` for what decided."""
        if limit is None:
            self._loads.acquire_tenant(tenant)
            return Admission(True, "unlimited")
        return await self._loads.admit_tenant(tenant, limit)

    def leave(self, tenant: str) -> None:
        """An admitted request ended, however it ended."""
        self._loads.release_tenant(tenant)

    def inflight(self, tenant: str) -> int:
        """The tenant's admitted requests in flight through this replica."""
        return self._loads.local_tenant_load(tenant)

    def fleet_inflight(self, tenant: str) -> int:
        """The tenant's requests in flight as last published (see `scope`)."""
        return self._loads.tenant_load(tenant)

    @property
    def scope(self) -> TenantScope:
        """What the estimate counts: this replica by design, the fleet, or this replica alone
        as a fallback (shared counts unavailable)."""
        return self._loads.tenant_scope
