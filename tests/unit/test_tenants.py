"""Tenants: API key -> tenant, trusted-header mode, and the per-tenant HMAC cache salt."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from router.config import ApiKey, TenantSettings
from router.errors import Unauthorized
from router.tenants import TenantResolver

ACME_KEY = "sk-acme-0123456789"
GLOBEX_KEY = "sk-globex-abcdef"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.messages)


@pytest.fixture
def warnings_log() -> Iterator[_Records]:
    """The tenants logger's records, captured on the logger itself (robust to propagate=False)."""
    logger = logging.getLogger("prefix_router.tenants")
    handler = _Records()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _settings(**fields: object) -> TenantSettings:
    defaults: dict[str, object] = {
        "api_keys": (
            ApiKey(tenant="acme", key=SecretStr(ACME_KEY)),
            ApiKey(tenant="globex", key_sha256=hashlib.sha256(GLOBEX_KEY.encode()).hexdigest()),
        ),
        "salt_secret": SecretStr("shared-replica-secret"),
    }
    defaults.update(fields)
    return TenantSettings.model_validate(defaults)


def test_key_in_clear_and_key_as_sha256_both_authenticate() -> None:
    """A client is recognised whether its key is configured in clear or as a sha256 digest."""
    resolver = TenantResolver(_settings())
    assert resolver.auth_enabled
    assert resolver.resolve({"Authorization": f"Bearer {ACME_KEY}"}) == "acme"
    assert resolver.resolve({"authorization": f"bearer  {GLOBEX_KEY} "}) == "globex"
    assert resolver.resolve({"x-api-key": GLOBEX_KEY}) == "globex"


def test_uppercase_sha256_in_config_still_matches() -> None:
    """A key digest written in upper-case hex authenticates like a lower-case one."""
    digest = hashlib.sha256(ACME_KEY.encode()).hexdigest().upper()
    resolver = TenantResolver(_settings(api_keys=(ApiKey(tenant="acme", key_sha256=digest),)))
    assert resolver.resolve({"Authorization": f"Bearer {ACME_KEY}"}) == "acme"


def test_wrong_key_is_unauthorized_with_a_clear_message() -> None:
    """A wrong key answers 401 'incorrect API key' and never echoes the key."""
    resolver = TenantResolver(_settings())
    with pytest.raises(Unauthorized) as excinfo:
        resolver.resolve({"Authorization": "Bearer sk-guess"})
    assert excinfo.value.status == 401
    assert excinfo.value.param == "authorization"
    assert "incorrect API key" in excinfo.value.message
    assert "sk-guess" not in excinfo.value.message


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer "}, {"Authorization": f"Basic {ACME_KEY}"}, {"x-api-key": ""}],
)
def test_missing_key_tells_the_client_how_to_send_one(headers: dict[str, str]) -> None:
    """Without a usable bearer key the client learns to send 'Authorization: Bearer <key>'."""
    resolver = TenantResolver(_settings())
    with pytest.raises(Unauthorized, match="Authorization: Bearer") as excinfo:
        resolver.resolve(headers)
    assert excinfo.value.param == "authorization"


def test_key_with_non_utf8_bytes_is_unauthorized_not_a_crash() -> None:
    """A key header carrying bytes that are not UTF-8 is simply a wrong key (401)."""
    resolver = TenantResolver(_settings())
    # aiohttp hands such header bytes over as lone surrogates (surrogateescape).
    with pytest.raises(Unauthorized, match="incorrect API key"):
        resolver.resolve({"Authorization": "Bearer sk-\udcff\udcfe"})


def test_no_keys_means_every_client_is_the_default_tenant(warnings_log: _Records) -> None:
    """With no API keys configured, auth is off (with a warning) and all traffic is default."""
    resolver = TenantResolver(_settings(api_keys=(), default_tenant="public"))
    assert not resolver.auth_enabled
    assert resolver.resolve({}) == "public"
    assert resolver.resolve({"Authorization": "Bearer anything"}) == "public"
    assert "authentication is off" in warnings_log.text


def test_trusted_header_names_the_tenant() -> None:
    """With trust_tenant_header on, the ingress-set header is the tenant, whatever the key."""
    resolver = TenantResolver(_settings(trust_tenant_header=True, tenant_header="x-org"))
    assert resolver.resolve({"x-org": " team-7 ", "Authorization": f"Bearer {ACME_KEY}"}) == (
        "team-7"
    )


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing x-org header"),
        ({"x-org": "   "}, "missing x-org header"),
        ({"x-org": "a\x00b"}, "invalid x-org header"),
        ({"x-org": "t" * 257}, "invalid x-org header"),
        ({"x-org": "bad-\udcff"}, "invalid x-org header"),
    ],
)
def test_trusted_header_missing_or_invalid_is_unauthorized(
    headers: dict[str, str], message: str
) -> None:
    """A missing, blank, overlong or unprintable tenant header is refused with 401."""
    resolver = TenantResolver(_settings(trust_tenant_header=True, tenant_header="x-org"))
    with pytest.raises(Unauthorized, match=message):
        resolver.resolve(headers)


def test_salts_differ_across_tenants_and_are_not_the_tenant_name() -> None:
    """Each tenant gets its own salt, and no salt reveals or equals a tenant name."""
    resolver = TenantResolver(_settings())
    tenants = ["acme", "globex", "public", "", "a" * 300]
    salts = [resolver.cache_salt(t) for t in tenants]
    assert len(set(salts)) == len(tenants)
    for tenant, salt in zip(tenants, salts, strict=True):
        assert salt != tenant
        if tenant:
            assert tenant not in salt
        # HMAC-SHA256 in unpadded url-safe base64: 43 characters, safe in JSON and headers.
        assert len(salt) == 43
        assert salt.replace("-", "").replace("_", "").isalnum()


def test_salts_are_stable_across_instances_with_the_same_secret() -> None:
    """Two replicas (or a restart) with the same secret compute the same salt."""
    first = TenantResolver(_settings())
    second = TenantResolver(_settings())
    assert first.cache_salt("acme") == second.cache_salt("acme")
    # The cached answer equals the computed one.
    assert first.cache_salt("acme") == first.cache_salt("acme")


def test_salts_differ_with_another_secret() -> None:
    """A different secret gives a different salt, so it cannot be guessed without the secret."""
    ours = TenantResolver(_settings(salt_secret=SecretStr("secret-one")))
    theirs = TenantResolver(_settings(salt_secret=SecretStr("secret-two")))
    assert ours.cache_salt("acme") != theirs.cache_salt("acme")


def test_missing_secret_warns_and_uses_a_fixed_dev_secret(warnings_log: _Records) -> None:
    """Without a salt secret the router warns loudly and still agrees with its other replicas."""
    first = TenantResolver(_settings(salt_secret=None))
    assert "no tenants.salt_secret configured" in warnings_log.text
    second = TenantResolver(_settings(salt_secret=None))
    assert first.cache_salt("acme") == second.cache_salt("acme")
    configured = TenantResolver(_settings())
    assert first.cache_salt("acme") != configured.cache_salt("acme")


def test_no_dev_secret_warning_when_a_secret_is_set(warnings_log: _Records) -> None:
    """A configured secret does not trigger the development-secret warning."""
    TenantResolver(_settings())
    assert "salt_secret" not in warnings_log.text
