"""The one typed settings tree, and the only place the environment is read.

Settings come from three layers, each overriding the one before:

1. YAML (or JSON) files given with ``--config`` (repeatable; later files override earlier);
2. environment variables ``PREFIX_ROUTER_<SECTION>__<FIELD>``, converted by the field's type
   (``PREFIX_ROUTER_ROUTING__LOAD_FACTOR=1.5`` is a float, ``true`` a bool for a bool field, and
   a secret stays exactly the string given; a value starting with ``[`` or ``{`` is parsed as
   YAML), plus ``PREFIX_ROUTER_WORKERS`` as a comma-separated list of URLs. The variables
   Kubernetes adds for a Service named prefix-router (``PREFIX_ROUTER_SERVICE_HOST`` ...) are
   ignored;
3. command-line flags (``--worker``, ``--port``, ``--policy`` ...).

OpenTelemetry's own variables (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME``,
``OTEL_TRACES_SAMPLER`` ...) are not settings of ours: `otel_env` hands them to
`router.telemetry`, which turns tracing on when an OTLP endpoint is named.

The result is frozen; each component receives its slice through its constructor. The four
routing thresholds can change at run time (``PUT /admin/config``) through `TuningState`, which
swaps a whole validated `Tuning` at once so a request never sees half an update. A reload
(SIGHUP, ``POST /admin/reload``) builds a whole new tree the same way and applies the fields
`router.reload` lists as live.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from router.core.model import PolicyName, Tuning

ENV_PREFIX = "PREFIX_ROUTER_"

# Kubernetes gives every pod <SERVICE>_SERVICE_HOST, <SERVICE>_PORT_8080_TCP_ADDR ... for each
# Service in its namespace; a Service named prefix-router(-*) puts those under our prefix, and
# they must not stop the router from starting.
_SERVICE_LINK = re.compile(
    r"(?:[A-Z0-9_]+_)?(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?"
    r"|PORT(?:_\d+_(?:TCP|UDP|SCTP)(?:_(?:ADDR|PORT|PROTO))?)?)"
)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    """Address to bind. Containers set 0.0.0.0."""
    port: int = Field(default=8080, ge=0, le=65535)
    """Port to bind; 0 picks a free one (the chosen URL is printed on stdout)."""
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    """Largest request body accepted; larger bodies get 413."""
    decision_headers: bool = True
    """Add ``x-prefix-router-worker`` and ``x-prefix-router-decision`` to responses."""
    admin_token: SecretStr | None = Field(default=None, min_length=1)
    """Bearer token for ``/admin/*``. Unset: the admin API is off (404). An empty token is
    refused: it would let anyone in with ``Authorization: Bearer``."""
    admin_port: int | None = Field(default=None, ge=0, le=65535)
    """Port of a separate admin listener (on `admin_host`); 0 picks a free one. Unset: no
    admin listener."""
    admin_host: str = "127.0.0.1"
    """Address of the admin listener: loopback by default, so only the pod itself (or a
    port-forward) reaches it."""
    admin_on_public_port: bool = False
    """Serve ``/admin/*`` on the public port too. Off by default: the admin API is reachable
    only on the `admin_port` listener (or not at all), never by accident where clients are."""
    max_line_bytes: int = Field(default=8190, ge=256, le=1_048_576)
    """Longest request line (method, path, query); longer gets 414 or 400."""
    max_header_bytes: int = Field(default=8190, ge=256, le=1_048_576)
    """Longest single header (name and value); longer gets 431 or 400."""
    max_headers: int = Field(default=128, ge=8, le=10_000)
    """Most request headers; more get 431 or 400, before any handler runs."""
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    """On SIGTERM, how long in-flight requests and streams may take to finish."""
    route_header: str = "x-prefix-router-route"
    """Optional request header naming the route (for metrics and logs); default: the endpoint."""
    prefix_version_header: str = "x-prefix-version"
    """Optional request header naming the prompt-prefix version (metrics and logs)."""

    @property
    def admin_public(self) -> bool:
        """Whether ``/admin/*`` is routed on the public port (only when asked for)."""
        return self.admin_on_public_port


class WorkerSpec(_Section):
    url: str
    """Base URL of a vLLM-compatible worker, e.g. ``http://10.0.0.5:8000``."""
    id: str | None = None
    """Stable name; defaults to ``host:port`` of the URL."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"worker url must be http(s)://host[:port], got {value!r}")
        return value.rstrip("/")

    @property
    def worker_id(self) -> str:
        if self.id:
            return self.id
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


class DiscoverySettings(_Section):
    """Where workers come from besides `workers` (and the admin API)."""

    kind: Literal["static", "dns"] = "static"
    """``static``: the `workers` list only. ``dns``: also every address `name` resolves to,
    re-resolved every `interval_s` (a Kubernetes headless Service)."""
    name: str | None = None
    """DNS name to resolve, e.g. ``vllm.llm.svc.cluster.local`` (a headless Service)."""
    port: int = Field(default=8000, ge=1, le=65535)
    """The workers' port; a discovered worker is ``scheme://ip:port``, its id ``ip:port``."""
    scheme: Literal["http", "https"] = "http"
    interval_s: float = Field(default=5.0, gt=0, le=3600)
    """How often to resolve `name` again (also the deadline of one resolution)."""
    family: Literal["any", "ipv4", "ipv6"] = "any"
    """Address records to use: A and AAAA (``any``), A only, or AAAA only. On a dual-stack
    cluster pick one, or every pod would be two workers."""

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        name = value.strip().rstrip(".")
        labels = name.split(".")
        if not name or len(name) > 253 or not all(_DNS_LABEL.fullmatch(x) for x in labels):
            raise ValueError(f"discovery.name must be a DNS name, got {value!r}")
        return name

    @model_validator(mode="after")
    def _name_for_dns(self) -> DiscoverySettings:
        if self.kind == "dns" and self.name is None:
            raise ValueError("discovery.kind is dns but discovery.name is not set")
        return self


class RoutingSettings(_Section):
    policy: PolicyName = "cache_aware"
    hasher: Literal["approx", "vllm"] = "approx"
    """``approx``: characters of the rendered prompt, no model files needed. ``vllm``: the
    model's tokenizer and vLLM's own block hashes (settings in `exact`)."""
    block_chars: int = Field(default=64, ge=4, le=4096)
    """Characters per block for the approximate hasher (about 16 tokens)."""
    vnodes: int = Field(default=128, ge=1, le=4096)
    """Virtual nodes per worker on the consistent-hash ring."""
    load_factor: float = Field(default=1.25, ge=1.0, le=100.0)
    min_match_blocks: int = Field(default=2, ge=1)
    min_match_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    affinity_blocks: int = Field(default=8, ge=1)
    load_floor: int = Field(default=4, ge=0, le=100_000)
    affinity_choices: int = Field(default=2, ge=1, le=64)

    def tuning(self) -> Tuning:
        return Tuning(
            load_factor=self.load_factor,
            min_match_blocks=self.min_match_blocks,
            min_match_ratio=self.min_match_ratio,
            affinity_blocks=self.affinity_blocks,
            load_floor=self.load_floor,
            affinity_choices=self.affinity_choices,
        )


class ExactSettings(_Section):
    """Exact mode (``routing.hasher: vllm``); every value must equal the workers' own."""

    model_dir: Path | None = None
    """Local directory with the model's tokenizer files (nothing is downloaded)."""
    block_size: int = Field(default=16, ge=1)
    """vLLM's ``--block-size``."""
    hash_algo: Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"] = "sha256"
    """vLLM's ``--prefix-caching-hash-algo``."""
    hash_seed: str = "vllm-none-hash"
    """The workers' PYTHONHASHSEED (``prefix-worker vllm --hash-seed``), or the default."""
    chat_template: str | None = None
    """vLLM's ``--chat-template``, if the workers use one."""
    content_format: Literal["auto", "string", "openai"] = "auto"
    """vLLM's ``--chat-template-content-format``."""
    lora_adapters: dict[str, str] = Field(default_factory=dict)
    """Served LoRA name -> adapter path, as in vLLM's ``--lora-modules``."""


class RedisSettings(_Section):
    url: SecretStr | None = None
    """``redis://[:password@]host:port/db``; needed when the index or the loads use Redis."""
    prefix: str = Field(default="pr", min_length=1, max_length=64)
    """Key prefix (a Redis hash tag), so several deployments can share one Redis."""
    op_timeout_s: float = Field(default=0.25, gt=0)
    """Longest a Redis call may take before routing falls back to the ring."""
    share_tuning: bool = True
    """When the index or the loads use Redis, ``PUT /admin/config`` changes the thresholds of
    every replica (and every ``--processes`` process) through Redis, and a replica that
    starts takes the fleet's live values (`router.shared_tuning`)."""
    tuning_poll_s: float = Field(default=1.0, gt=0, le=60)
    """How often a replica checks Redis for thresholds changed on another replica."""


class IndexSettings(_Section):
    kind: Literal["memory", "redis"] = "memory"
    """``memory``: embedded, one replica. ``redis``: shared by every replica (`redis.url`)."""
    capacity_blocks: int = Field(default=100_000, ge=1)
    """Most blocks remembered per worker (LRU). A worker whose ``/metrics`` report its KV cache
    size (``vllm:cache_config_info``) gets that size instead, when smaller."""
    predicted_ttl_s: float = Field(default=120.0, gt=0)
    """How long a routing prediction counts as warm until a response confirms it."""
    kv_events: bool = False
    """KV-event sidecars (``prefix-worker kv-events``) feed this index: stores and evictions
    come from vLLM's own events, and the router records only short-lived predictions."""


class LoadSettings(_Section):
    kind: Literal["local", "redis"] = "local"
    """``local``: this replica's in-flight counts. ``redis``: summed over every replica."""
    publish_interval_s: float = Field(default=0.1, gt=0)
    """How often a replica publishes its counts and reads the others'."""
    replica_ttl_s: float = Field(default=2.0, gt=0)
    """A replica that stops publishing stops counting after this long."""


class ApiKey(_Section):
    tenant: str = Field(min_length=1, max_length=256)
    key: SecretStr | None = None
    """The key in clear (convenient for development)."""
    key_sha256: str | None = None
    """Hex SHA-256 of the key (preferred: the config then holds no usable secret)."""

    @model_validator(mode="after")
    def _one_form(self) -> ApiKey:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError(
                f"api key for tenant {self.tenant!r}: give exactly one of key, key_sha256"
            )
        if self.key_sha256 is not None:
            digest = self.key_sha256.lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(
                    f"api key for tenant {self.tenant!r}: key_sha256 is not hex SHA-256"
                )
        return self

    def digest(self) -> str:
        if self.key_sha256 is not None:
            return self.key_sha256.lower()
        assert self.key is not None
        return hashlib.sha256(self.key.get_secret_value().encode()).hexdigest()


class TenantSettings(_Section):
    api_keys: tuple[ApiKey, ...] = ()
    """Known API keys. Empty: authentication is off and every client is `default_tenant`."""
    trust_tenant_header: bool = False
    """Take the tenant from `tenant_header` (set by a trusted ingress) instead of the API key."""
    tenant_header: str = "x-tenant-id"
    default_tenant: str = "public"
    salt_secret: SecretStr | None = Field(default=None, min_length=1)
    """Secret for ``cache_salt = HMAC(secret, tenant)``. Must be the same on every replica and
    stable across restarts. Unset: a fixed development secret, with a loud warning."""
    max_concurrent_per_tenant: int | None = Field(default=None, ge=1)
    """Most inference requests one tenant may have in flight; past it, 429 with
    ``Retry-After``. Counted on this replica with ``loads.kind: local``; over the whole fleet,
    exactly, with ``loads.kind: redis`` (an estimate while Redis fails). Unset: unlimited."""

    @model_validator(mode="after")
    def _keys_name_one_tenant(self) -> TenantSettings:
        owners: dict[str, str] = {}
        for api_key in self.api_keys:
            owner = owners.setdefault(api_key.digest(), api_key.tenant)
            if owner != api_key.tenant:
                raise ValueError(
                    f"the same API key is given for tenants {owner!r} and {api_key.tenant!r}"
                )
        return self


class UpstreamSettings(_Section):
    connect_timeout_s: float = Field(default=2.0, gt=0)
    first_byte_timeout_s: float = Field(default=300.0, gt=0)
    """From sending the request to the worker's response headers (includes queueing; for a
    non-streaming request vLLM sends headers only when the whole answer is ready)."""
    idle_timeout_s: float = Field(default=60.0, gt=0)
    """Longest silence allowed between two chunks of a response."""
    total_timeout_s: float = Field(default=900.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, le=10)
    """Workers tried for one request before the first byte reached the client."""
    pool_per_worker: int = Field(default=1024, ge=1)
    """Keep-alive connection pool size per worker."""
    api_key: SecretStr | None = None
    """Sent to workers as ``Authorization: Bearer`` (vLLM's ``--api-key``); client keys are
    never forwarded."""


class HealthSettings(_Section):
    probe_interval_s: float = Field(default=2.0, gt=0)
    probe_timeout_s: float = Field(default=1.0, gt=0)
    failures_to_eject: int = Field(default=3, ge=1)
    """Consecutive failures (requests or probes) that open the circuit."""
    eject_base_s: float = Field(default=2.0, gt=0)
    """First ejection length; doubles on each re-ejection up to `eject_max_s`."""
    eject_max_s: float = Field(default=30.0, gt=0)
    scrape_interval_s: float = Field(default=5.0, ge=0)
    """How often to read each worker's vLLM ``/metrics`` (running, waiting, KV usage); 0: never."""


class TelemetrySettings(_Section):
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    access_log: bool = True
    """One structured line per request (ids, route, worker, decision, tokens, timings)."""
    label_limit: int = Field(default=64, ge=1, le=10_000)
    """Distinct tenant, route and prefix-version label values kept; the rest become 'other'."""


class InsightsSettings(_Section):
    """The prompt-shape advisor, prefix-version warmup and the savings report
    (``GET /admin/insights``; docs/insights.md)."""

    enabled: bool = True
    """Off: no insights are kept, ``/admin/insights`` answers an empty report."""
    sample_rate: float = Field(default=1 / 32, ge=0.0, le=1.0)
    """Share of requests whose prompt shape is analysed (after each route and tenant's first
    `min_samples`, which always are). Usage, versions and savings count every request."""
    min_samples: int = Field(default=8, ge=1, le=10_000)
    """Requests of a route and tenant always analysed at first; a shape is judged only with
    at least this many samples."""
    route_by: tuple[Literal["path", "model", "header"], ...] = ("header",)
    """What names a route: the endpoint (``chat``, ``completions``), the model, the route
    header; parts present are joined with ``/``. Without any: the endpoint."""
    route_header: str | None = None
    """Header read for the ``header`` part; unset: `server.route_header`."""
    max_routes: int = Field(default=32, ge=1, le=10_000)
    """Distinct routes tracked; later ones are folded into ``other``."""
    max_tenants: int = Field(default=64, ge=1, le=100_000)
    """Distinct tenants tracked; later ones are folded into ``other``."""
    max_versions: int = Field(default=8, ge=1, le=1_000)
    """Prefix versions tracked per route and tenant (the least recently seen is dropped)."""
    fingerprint_slots: int = Field(default=4096, ge=64, le=1 << 20)
    """Slots of each route's two fingerprint tables (8 bytes each; rounded up to a power of 2)."""
    min_savings_tokens: int = Field(default=256, ge=1)
    """A route is flagged when reordering would save at least this many prefill tokens per
    request on average."""
    warmup_recovery: float = Field(default=0.8, gt=0.0, le=1.0)
    """A new prefix version is warm once one of its requests reaches this share of the
    route's usual cached-token ratio."""
    warmup_max_requests: int = Field(default=100, ge=1)
    """A version not warm after this many requests stops counting as warmup (a real drop)."""
    prefill_tokens_per_s: float | None = Field(default=None, gt=0)
    """Prefill throughput of one worker, for GPU-seconds saved; unset: measured from TTFT."""
    input_price_per_mtok: float | None = Field(default=None, ge=0)
    """Price of a million uncached input tokens; unset: no money figures."""
    cached_read_multiplier: float = Field(default=0.1, ge=0.0, le=1.0)
    """Price of a cached token as a share of the input price."""
    cache_write_multiplier: float = Field(default=1.25, ge=1.0, le=10.0)
    """Price of writing a token to the cache as a multiple of the input price (1.25: a
    5-minute cache, 2.0: a 1-hour one; 1.0: no write premium)."""
    currency: str = Field(default="USD", min_length=1, max_length=8)


class Settings(_Section):
    server: ServerSettings = ServerSettings()
    workers: tuple[WorkerSpec, ...] = ()
    discovery: DiscoverySettings = DiscoverySettings()
    routing: RoutingSettings = RoutingSettings()
    index: IndexSettings = IndexSettings()
    loads: LoadSettings = LoadSettings()
    redis: RedisSettings = RedisSettings()
    exact: ExactSettings = ExactSettings()
    tenants: TenantSettings = TenantSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    health: HealthSettings = HealthSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    insights: InsightsSettings = InsightsSettings()

    @model_validator(mode="after")
    def _unique_workers(self) -> Settings:
        seen: set[str] = set()
        for spec in self.workers:
            if spec.worker_id in seen:
                raise ValueError(f"duplicate worker id {spec.worker_id!r}")
            seen.add(spec.worker_id)
        return self

    @model_validator(mode="after")
    def _redis_when_used(self) -> Settings:
        users = [name for name in ("index", "loads") if getattr(self, name).kind == "redis"]
        if users and self.redis.url is None:
            raise ValueError(f"{' and '.join(users)}.kind is redis but redis.url is not set")
        if self.routing.hasher == "vllm" and self.exact.model_dir is None:
            raise ValueError("routing.hasher is vllm but exact.model_dir is not set")
        if self.loads.replica_ttl_s <= self.loads.publish_interval_s:
            raise ValueError("loads.replica_ttl_s must be longer than loads.publish_interval_s")
        return self

    @property
    def shares_tuning(self) -> bool:
        """Live thresholds are shared through Redis: it is configured for the index or the
        loads (so replicas share state already) and `redis.share_tuning` is on."""
        uses_redis = "redis" in (self.index.kind, self.loads.kind)
        return uses_redis and self.redis.share_tuning and self.redis.url is not None


class ConfigError(ValueError):
    """The settings could not be loaded; the message says which source and field."""


def otel_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """OpenTelemetry's standard variables (``OTEL_*``), for `router.telemetry.Tracing`."""
    source = os.environ if env is None else env
    return {name: value for name, value in source.items() if name.startswith("OTEL_")}


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _env_layer(env: Mapping[str, str]) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX) :].lower()
        if path == "workers":
            layer["workers"] = [{"url": url.strip()} for url in raw.split(",") if url.strip()]
            continue
        section, sep, field = path.partition("__")
        if not sep or not field:
            if _SERVICE_LINK.fullmatch(name[len(ENV_PREFIX) :]):
                continue
            raise ConfigError(f"{name}: expected {ENV_PREFIX}<SECTION>__<FIELD>")
        layer.setdefault(section, {})[field] = _env_value(raw)
    return layer


def _env_value(raw: str) -> Any:
    """Lists and mappings are parsed as YAML; scalars stay strings and pydantic converts them
    by the field's type, so a secret like ``0777`` or ``yes`` stays exactly that string."""
    if not raw.lstrip().startswith(("[", "{")):
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _describe(exc: ValidationError) -> str:
    """Each error as ``field.path: message``, never with the input value (it may be a secret)."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}"
        for error in exc.errors(include_url=False, include_input=False, include_context=False)
    )


def _read_file(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    except yaml.YAMLError as exc:
        # Not str(exc): PyYAML quotes the offending line, which may hold a secret.
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"cannot read config {path}: {problem}{where}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config {path}: top level must be a mapping")
    return loaded or {}


def load_settings(
    config_path: Path | Sequence[Path] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from the file(s), then environment, then ``overrides`` (the CLI).

    Several files merge in order, later ones overriding earlier ones section by section (a
    list, such as ``tenants.api_keys``, is replaced whole): a ConfigMap's settings and a
    Secret's keys can then both be files, and both reload on SIGHUP."""
    paths = [config_path] if isinstance(config_path, Path) else list(config_path or ())
    data: dict[str, Any] = {}
    for path in paths:
        data = _deep_merge(data, _read_file(path))
    data = _deep_merge(data, _env_layer(os.environ if env is None else env))
    if overrides:
        data = _deep_merge(data, overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid settings: {_describe(exc)}") from None


class TuningState:
    """Holder of the live `Tuning`; `update` validates and swaps the whole value at once."""

    def __init__(self, initial: Tuning) -> None:
        self._current = initial

    @property
    def current(self) -> Tuning:
        return self._current

    def update(self, changes: Mapping[str, Any]) -> Tuning:
        """Apply a partial update; raises ValueError naming the bad field, leaving state as is."""
        return self.set(self.merged(changes))

    def set(self, tuning: Tuning) -> Tuning:
        """Swap in a whole, already valid `Tuning`."""
        self._current = tuning
        return tuning

    def merged(self, changes: Mapping[str, Any], onto: Tuning | None = None) -> Tuning:
        """``onto`` (default: the current tuning) with ``changes`` applied, validated; the
        state is not changed. Raises ValueError naming the first bad or unknown field."""
        base = self._current if onto is None else onto
        allowed = set(Tuning.__dataclass_fields__)
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise ValueError(f"unknown tuning fields {unknown}; allowed: {sorted(allowed)}")
        values: dict[str, Any] = {name: getattr(base, name) for name in allowed}
        for name, value in changes.items():
            # The declared type (from the default), not the current value's: Tuning(2) holds
            # an int load_factor that must still accept 1.5.
            default = Tuning.__dataclass_fields__[name].default
            expected: type[int] | type[float] = int if isinstance(default, int) else float
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            try:
                finite = math.isfinite(value)
            except OverflowError:
                finite = False
            if not finite:
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if expected is int and (not isinstance(value, int) and not float(value).is_integer()):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            values[name] = expected(value)
        return Tuning(**values)
