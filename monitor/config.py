"""Settings: one YAML file, validated with pydantic; tenants, clouds and their endpoints."""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from monitor import safe_yaml
from monitor.durations import parse_duration
from monitor.redact import register_secrets, secrets_in

DEFAULT_CONFIG_PATH = Path("config/monitor.yaml")
CONFIG_ENV = "MDE_MONITOR_CONFIG"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """A configuration problem, naming the file and the field."""


class PollingInterval(StrEnum):
    DISABLED = "DISABLED"
    FIFTEEN_MINUTES = "FIFTEEN_MINUTES"
    THIRTY_MINUTES = "THIRTY_MINUTES"
    ONE_HOUR = "ONE_HOUR"
    FOUR_HOURS = "FOUR_HOURS"
    EIGHT_HOURS = "EIGHT_HOURS"
    TWELVE_HOURS = "TWELVE_HOURS"
    ONE_DAY = "ONE_DAY"
    ONE_WEEK = "ONE_WEEK"

    @property
    def seconds(self) -> int | None:
        """Seconds between syncs, or None when disabled."""
        return _INTERVAL_SECONDS[self]


_INTERVAL_SECONDS: dict[PollingInterval, int | None] = {
    PollingInterval.DISABLED: None,
    PollingInterval.FIFTEEN_MINUTES: 15 * 60,
    PollingInterval.THIRTY_MINUTES: 30 * 60,
    PollingInterval.ONE_HOUR: 3600,
    PollingInterval.FOUR_HOURS: 4 * 3600,
    PollingInterval.EIGHT_HOURS: 8 * 3600,
    PollingInterval.TWELVE_HOURS: 12 * 3600,
    PollingInterval.ONE_DAY: 86400,
    PollingInterval.ONE_WEEK: 7 * 86400,
}


@dataclass(frozen=True)
class ApiEndpoint:
    """One API's base URL and the OAuth scope its tokens are minted for."""

    base_url: str
    scope: str


@dataclass(frozen=True)
class CloudEndpoints:
    authority: str  # e.g. https://login.microsoftonline.com (the tenant id is appended)
    graph: ApiEndpoint  # base without version; clients append /v1.0
    defender: ApiEndpoint  # base; clients append /api/...


def origin(url: str) -> str:
    """scheme://host[:port] of a URL."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"not an absolute URL: {url!r}")
    return f"{parts.scheme}://{parts.netloc}"


def scope_for(url: str) -> str:
    """The `.default` scope of the API at this URL's origin."""
    return f"{origin(url)}/.default"


_DEFENDER_RESOURCE = "https://api.securitycenter.microsoft.com/.default"
# Token audiences of the WindowsDefenderATP app in the US government clouds. Microsoft's
# "Defender for Endpoint for US Government customers" page lists only the hosts
# (api-gcc.securitycenter.microsoft.us, api-gov.securitycenter.microsoft.us); the app ID URIs
# are those the Defender docs use in token requests (.../windowsatpservice) in the cloud's own
# Entra ID: GCC signs in to the commercial Entra ID (login.microsoftonline.com), GCC High and DoD
# to login.microsoftonline.us. A tenant's `defender_scope` overrides these.
_DEFENDER_GCC_SCOPE = "https://securitycenter.onmicrosoft.com/windowsatpservice/.default"
_DEFENDER_GOV_SCOPE = "https://securitycenter.onmicrosoft.us/windowsatpservice/.default"
# Regional API hosts (Defender API docs, "Supported Microsoft Defender for Endpoint APIs").
_DEFENDER_PUBLIC_HOSTS = {
    None: "https://api.security.microsoft.com",
    "us": "https://us.api.security.microsoft.com",
    "eu": "https://eu.api.security.microsoft.com",
    "uk": "https://uk.api.security.microsoft.com",
    "au": "https://au.api.security.microsoft.com",
    "swa": "https://swa.api.security.microsoft.com",
    "ina": "https://ina.api.security.microsoft.com",
}


class Cloud(StrEnum):
    PUBLIC = "public"
    GCC = "gcc"
    GCC_HIGH = "gcc-high"
    DOD = "dod"
    CUSTOM = "custom"


def _known_cloud(cloud: Cloud, region: str | None) -> CloudEndpoints:
    if cloud is Cloud.PUBLIC:
        graph = "https://graph.microsoft.com"
        return CloudEndpoints(
            "https://login.microsoftonline.com",
            ApiEndpoint(graph, scope_for(graph)),
            ApiEndpoint(_DEFENDER_PUBLIC_HOSTS[region], _DEFENDER_RESOURCE),
        )
    if cloud is Cloud.GCC:
        graph = "https://graph.microsoft.com"
        defender = "https://api-gcc.securitycenter.microsoft.us"
        return CloudEndpoints(
            "https://login.microsoftonline.com",
            ApiEndpoint(graph, scope_for(graph)),
            ApiEndpoint(defender, _DEFENDER_GCC_SCOPE),
        )
    graph = (
        "https://graph.microsoft.us"
        if cloud is Cloud.GCC_HIGH
        else "https://dod-graph.microsoft.us"
    )
    defender = "https://api-gov.securitycenter.microsoft.us"
    return CloudEndpoints(
        "https://login.microsoftonline.us",
        ApiEndpoint(graph, scope_for(graph)),
        ApiEndpoint(defender, _DEFENDER_GOV_SCOPE),
    )


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CustomEndpoints(_Model):
    """Explicit base URLs (the simulator, a proxy, a sovereign cloud we do not know)."""

    authority: str
    graph: str
    defender: str

    @model_validator(mode="after")
    def _absolute(self) -> CustomEndpoints:
        for name in ("authority", "graph", "defender"):
            value = getattr(self, name)
            try:
                origin(value)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return self


# Separators people paste thumbprints with (`AA:BB:..`, `AA BB ..`, `AA-BB-..`) and the invisible
# marks Windows' certificate dialog copies along (LRM/RLM, BOM, no-break space).
_THUMBPRINT_NOISE = str.maketrans("", "", ": -\t\u200e\u200f\ufeff\u00a0")
_HEX = frozenset("0123456789ABCDEF")


def normalize_thumbprint(value: str) -> str:
    """A certificate's SHA-1 thumbprint as 40 upper-case hex digits (separators removed).

    ValueError, saying what is wrong, for anything else (a SHA-256 thumbprint included)."""
    digits = value.translate(_THUMBPRINT_NOISE).upper()
    if not digits:
        raise ValueError("the thumbprint is empty")
    if not set(digits) <= _HEX:
        bad = sorted(set(digits) - _HEX)[:3]
        raise ValueError(
            f"a thumbprint is hex digits (0-9, A-F), found {', '.join(map(repr, bad))}"
        )
    if len(digits) == 64:
        raise ValueError(
            "this is a SHA-256 thumbprint (64 hex digits); Entra ID needs the certificate's SHA-1"
            " thumbprint (40 hex digits, the 'Thumbprint' column of the app's Certificates & secrets)"
        )
    if len(digits) != 40:
        raise ValueError(f"a SHA-1 thumbprint has 40 hex digits, got {len(digits)}")
    return digits


class Certificate(_Model):
    """Certificate credential: a PEM private key + certificate with its thumbprint, or a PFX."""

    pem_path: Path | None = None
    thumbprint: str | None = None
    pfx_path: Path | None = None
    pfx_password: SecretStr | None = None

    @field_validator("thumbprint")
    @classmethod
    def _sha1_thumbprint(cls, value: str | None) -> str | None:
        return None if value is None else normalize_thumbprint(value)

    @model_validator(mode="after")
    def _one_form(self) -> Certificate:
        if self.pfx_path is None and (self.pem_path is None or not self.thumbprint):
            raise ValueError("give pem_path and thumbprint, or pfx_path")
        return self


class HrColumns(_Model):
    """Which column (CSV header) or key (JSON) of the HR export holds each field."""

    email: str = "email"
    employee_id: str = "employee_id"
    name: str = "name"
    manager_email: str = "manager_email"
    status: str = "status"
    termination_date: str = "termination_date"


class HrFile(_Model):
    """An HR export (Workday, BambooHR, ...): CSV with a header row, or a JSON list of objects."""

    path: Path
    format: Literal["csv", "json"] | None = None  # None: by the file's suffix
    columns: HrColumns = Field(default_factory=HrColumns)
    terminated_values: list[str] = Field(default_factory=lambda: ["terminated", "inactive"])


class DirectoryEmployees(_Model):
    """Which directory users are employees: by default member users with an employeeId."""

    enabled: bool = True
    user_types: list[str] = Field(default_factory=lambda: ["Member"])
    require_employee_id: bool = True
    # manager chain via `$expand=manager($select=id)`: Graph then pages users by 100, not 999
    managers: bool = False


MatchRule = Literal["employee_id", "email", "upn"]
DEFAULT_MATCH: tuple[MatchRule, ...] = ("employee_id", "email", "upn")


class IdentitySettings(_Model):
    """Employees, logon-account mapping, groups and directory roles (monitor.model.identity)."""

    directory_employees: DirectoryEmployees = Field(default_factory=DirectoryEmployees)
    hr_file: HrFile | None = None
    # how a directory user is matched to an employee, in order (case-insensitive)
    match: list[MatchRule] = Field(default_factory=lambda: list(DEFAULT_MATCH))
    # NetBIOS domain (as in logon users' accountDomain) -> on-premises DNS domain
    netbios_domains: dict[str, str] = Field(default_factory=dict)
    groups: bool = True
    directory_roles: bool = True


_WINDOW = re.compile(r"^\s*(\d+)\s*([dhm])\s*$")
_WINDOW_UNIT = {"d": 86400, "h": 3600, "m": 60}
MAX_HUNTING_WINDOW_SECONDS = 30 * 86400  # advanced hunting keeps 30 days of data


def window_seconds(text: str) -> int:
    """`30d`, `12h`, `90m` as seconds (1 minute to 30 days); ValueError otherwise."""
    m = _WINDOW.match(text)
    if not m:
        raise ValueError(f"a window is a number and d, h or m (e.g. 30d, 12h), got {text!r}")
    seconds = int(m.group(1)) * _WINDOW_UNIT[m.group(2)]
    if not 60 <= seconds <= MAX_HUNTING_WINDOW_SECONDS:
        raise ValueError(
            f"the window must be between 1m and 30d (advanced hunting keeps 30 days), got {text!r}"
        )
    return seconds


IDENTITY_INTERVAL_BOUNDS = (10.0, 86400.0)  # seconds: not a busy loop, not rarer than daily


def interval_seconds(text: str) -> float:
    """An identity-lane interval (the rule files' duration grammar: `1m`, `30s`, `1h30m`) as
    seconds, 10 seconds to 1 day; ValueError otherwise."""
    seconds = parse_duration(text)
    low, high = IDENTITY_INTERVAL_BOUNDS
    if not low <= seconds <= high:
        raise ValueError(f"the interval must be between 10s and 1d, got {text!r}")
    return seconds


class TenantConfig(_Model):
    """One connected Entra ID tenant (an app registration)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    tenant_id: str = Field(min_length=1)
    client_id: str = Field(min_length=1)
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    certificate: Certificate | None = None
    polling_interval: PollingInterval = PollingInterval.ONE_HOUR
    cloud: Cloud = Cloud.PUBLIC
    region: Literal["us", "eu", "uk", "au", "swa", "ina"] | None = None
    endpoints: CustomEndpoints | None = None
    # The Defender token audience when the cloud's default is not the tenant's
    # (e.g. "https://securitycenter.onmicrosoft.us/windowsatpservice/.default").
    defender_scope: str | None = None
    tag_with_account_name: bool = False
    logon_user_budget: int = Field(default=500, ge=0)
    logon_user_concurrency: int = Field(default=8, ge=1, le=64)
    # users by `/users/delta` (only the changes after the first sync) or, when false, the full
    # list every sync (monitor.collect.users)
    users_delta: bool = True
    # rotation: /logonusers per machine within logon_user_budget; hunting: every machine's logon
    # users through advanced hunting (AdvancedQuery.Read.All) over `logon_users_window`
    logon_users: Literal["rotation", "hunting"] = "rotation"
    logon_users_window: str = "30d"
    # rows one hunting query may return (Microsoft's documented 100,000); a query that returns
    # this many is taken as cut and its device range is split
    hunting_max_rows: int = Field(default=100_000, ge=2, le=100_000)
    identity: IdentitySettings = Field(default_factory=IdentitySettings)
    # the identity lane: users (by delta), groups, roles and employees on their own short
    # schedule, between the tenant's full syncs ("off": only with them; needs users_delta)
    identity_interval: str = "1m"

    @field_validator("identity_interval")
    @classmethod
    def _identity_interval(cls, value: str) -> str:
        value = "".join(value.split()).lower()
        if value != "off":
            interval_seconds(value)  # raises ValueError naming the problem
        return value

    def identity_seconds(self) -> float | None:
        """Seconds between identity-lane syncs; None when off or without users_delta (each run
        would read every user). The schedule runs the lane only when it is the shorter one."""
        if self.identity_interval == "off" or not self.users_delta:
            return None
        return interval_seconds(self.identity_interval)

    @field_validator("logon_users_window")
    @classmethod
    def _window(cls, value: str) -> str:
        window_seconds(value)  # raises ValueError naming the problem
        return "".join(value.split())  # as KQL writes a timespan: 30d

    @model_validator(mode="after")
    def _credentials_and_cloud(self) -> TenantConfig:
        given = [
            n for n in ("client_secret", "client_secret_file", "certificate") if getattr(self, n)
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of client_secret, client_secret_file, certificate"
                f" (got {', '.join(given) or 'none'})"
            )
        if self.cloud is Cloud.CUSTOM and self.endpoints is None:
            raise ValueError("cloud: custom needs endpoints: {authority, graph, defender}")
        if self.cloud is not Cloud.CUSTOM and self.endpoints is not None:
            raise ValueError("endpoints are only used with cloud: custom")
        if self.region is not None and self.cloud is not Cloud.PUBLIC:
            raise ValueError("region is only used with cloud: public")
        if self.defender_scope is not None:
            scope = self.defender_scope.strip()
            try:
                origin(scope)
            except ValueError:
                raise ValueError(
                    "defender_scope must be an absolute URI ending in /.default, e.g."
                    " https://securitycenter.onmicrosoft.us/windowsatpservice/.default"
                ) from None
            if not scope.endswith("/.default"):
                raise ValueError(
                    f"defender_scope must end in /.default (client credentials), got {scope!r}"
                )
            self.defender_scope = scope
        return self

    def secret(self) -> str | None:
        """The client secret, read from the file when configured so."""
        if self.client_secret is not None:
            return self.client_secret.get_secret_value()
        if self.client_secret_file is not None:
            return self.client_secret_file.read_text().strip()
        return None

    def cloud_endpoints(self) -> CloudEndpoints:
        """Authority, Graph and Defender URLs with their scopes (`defender_scope` wins)."""
        if self.cloud is Cloud.CUSTOM:
            assert self.endpoints is not None
            ep = self.endpoints
            graph, defender = ep.graph.rstrip("/"), ep.defender.rstrip("/")
            known = CloudEndpoints(
                ep.authority.rstrip("/"),
                ApiEndpoint(graph, scope_for(graph)),
                ApiEndpoint(defender, scope_for(defender)),
            )
        else:
            known = _known_cloud(self.cloud, self.region)
        if self.defender_scope is None:
            return known
        return CloudEndpoints(
            known.authority,
            known.graph,
            ApiEndpoint(known.defender.base_url, self.defender_scope),
        )


class HttpSettings(_Model):
    timeout_seconds: float = Field(default=30.0, gt=0)
    max_retry_seconds: float = Field(default=120.0, ge=0)
    max_attempts: int = Field(default=6, ge=1)
    backoff_base_seconds: float = Field(default=1.0, ge=0)
    backoff_max_seconds: float = Field(default=30.0, ge=0)
    proxy: str | None = None

    def backoff(self, attempt: int) -> float:
        """The wait before retry `attempt` + 1: capped exponential backoff, half of it jitter."""
        backoff = min(self.backoff_max_seconds, self.backoff_base_seconds * 2 ** (attempt - 1))
        return backoff / 2 + random.uniform(0, backoff / 2)


class DetectSettings(_Model):
    """Diff noise control, the deletion guard rail and when a commit is built aside."""

    volatile_fields: dict[str, list[str]] | None = None  # _type -> fields; None = defaults
    drop_threshold: float = Field(default=0.5, gt=0, le=1)
    drop_min_items: int = Field(default=10, ge=0)
    drop_persist_syncs: int = Field(default=3, ge=1)
    # a commit writing + deleting at least this many bodies builds the new snapshot version
    # aside and switches to it in a small transaction (monitor/snapshot/commit.py)
    commit_aside_min_items: int = Field(default=100_000, ge=1)


class EventSettings(_Model):
    stream_maxlen: int = Field(default=100_000, ge=100)
    retention_days: float = Field(default=30.0, gt=0)


class WebToken(_Model):
    """A static bearer token for the console (headless use, or sign-in with a token)."""

    name: str = Field(min_length=1)
    role: Literal["viewer", "operator"] = "viewer"
    token: SecretStr | None = None
    token_file: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> WebToken:
        if (self.token is None) == (self.token_file is None):
            raise ValueError("give exactly one of token, token_file")
        return self

    def secret(self) -> str:
        if self.token is not None:
            return self.token.get_secret_value()
        assert self.token_file is not None
        return self.token_file.read_text().strip()


class WebOidc(_Model):
    """Sign-in with Entra ID (OIDC authorization-code flow through MSAL)."""

    tenant: str = Field(min_length=1)  # a configured tenant's name: its tenant id and cloud
    client_id: str = Field(min_length=1)
    client_secret: SecretStr
    operator_groups: list[str] = Field(default_factory=list)
    operator_roles: list[str] = Field(default_factory=list)
    viewer_groups: list[str] = Field(default_factory=list)
    viewer_roles: list[str] = Field(default_factory=list)


class WebSettings(_Model):
    """The console (`mde-monitor web`)."""

    public_url: str | None = None  # where people reach it; notifications link here
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    tokens: list[WebToken] = Field(default_factory=list)
    oidc: WebOidc | None = None
    session_hours: float = Field(default=8.0, gt=0)


class RedisTlsSettings(_Model):
    """TLS for `rediss://` URLs (every client: CLI, worker, beat, result backend, redbeat).

    Without `ca_bundle` the server certificate is checked against the system CAs (what Azure Cache
    for Redis and ElastiCache need). Values given in the URL's query win over these.
    """

    ca_bundle: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    ssl_cert_reqs: str | None = Field(
        default=None, pattern=r"(?i)^(cert_)?(required|optional|none)$"
    )


class Settings(_Model):
    """The whole configuration file."""

    redis_url: str = DEFAULT_REDIS_URL
    redis_prefix: str = "mde"
    redis: RedisTlsSettings = Field(default_factory=RedisTlsSettings)
    ca_bundle: Path | None = None
    alerts_dir: Path = Path("alerts")
    tenants: list[TenantConfig] = Field(default_factory=list)
    http: HttpSettings = Field(default_factory=HttpSettings)
    detect: DetectSettings = Field(default_factory=DetectSettings)
    events: EventSettings = Field(default_factory=EventSettings)
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    web: WebSettings = Field(default_factory=WebSettings)
    source_path: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        seen: set[str] = set()
        for t in self.tenants:
            if t.name in seen:
                raise ValueError(f"tenant name {t.name!r} is used twice")
            seen.add(t.name)
        return self

    def tenant(self, name: str) -> TenantConfig:
        """The tenant with this name; ConfigError naming the known ones otherwise."""
        for t in self.tenants:
            if t.name == name:
                return t
        known = ", ".join(t.name for t in self.tenants) or "none configured"
        raise ConfigError(f"unknown tenant {name!r} (known: {known})")


def _interpolate(value: Any, where: str, missing: list[str]) -> Any:
    if isinstance(value, str):

        def repl(m: re.Match[str]) -> str:
            var, default = m.group(1), m.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default
            missing.append(f"{where}: environment variable {var} is not set")
            return ""

        return _ENV_REF.sub(repl, value)
    if isinstance(value, dict):
        return {
            k: _interpolate(v, f"{where}.{k}" if where else str(k), missing)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_interpolate(v, f"{where}[{i}]", missing) for i, v in enumerate(value)]
    return value


def field_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as `tenants[0].client_secret`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def parse_settings(data: Any, source: str) -> Settings:
    """Validate an already-parsed mapping; errors name `source` and the field path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    missing: list[str] = []
    data = _interpolate(data, "", missing)
    if missing:
        raise ConfigError(f"{source}: " + "; ".join(missing))
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {field_path(err['loc'])}: {msg}")
        raise ConfigError("\n".join(lines)) from None
    if settings.ca_bundle is not None and not settings.ca_bundle.is_file():
        raise ConfigError(f"{source}: ca_bundle: file not found: {settings.ca_bundle}")
    for name in ("ca_bundle", "client_cert", "client_key"):
        path = getattr(settings.redis, name)
        if path is not None and not path.is_file():
            raise ConfigError(f"{source}: redis.{name}: file not found: {path}")
    return settings


def redis_url_with_tls(settings: Settings, url: str | None = None) -> str:
    """`url` (default: the config's) with the `redis:` TLS files as query parameters and the
    password from $REDIS_PASSWORD_FILE when the URL has none."""
    from monitor.redis_conn import with_password_file, with_tls

    tls = settings.redis
    try:
        url = with_password_file(url or settings.redis_url)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return with_tls(url, tls.ca_bundle, tls.client_cert, tls.client_key, tls.ssl_cert_reqs)


def config_path(explicit: str | Path | None = None) -> Path:
    """--config, else $MDE_MONITOR_CONFIG, else config/monitor.yaml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_settings(path: str | Path | None = None) -> Settings:
    """Read and validate the YAML config; REDIS_URL in the environment wins over the file."""
    p = config_path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found (use --config or ${CONFIG_ENV})") from None
    try:  # bounded: no alias bombs, deep nesting or non-UTF-8 surprises (monitor.safe_yaml)
        data = safe_yaml.load_file(p)
    except safe_yaml.YamlFileError as exc:
        raise ConfigError(str(exc)) from None
    settings = parse_settings(data, str(p))
    register_secrets(secrets_in(settings))  # masked everywhere by exact value
    if os.environ.get("REDIS_URL"):
        settings.redis_url = os.environ["REDIS_URL"]
    settings.redis_url = redis_url_with_tls(settings)
    settings.source_path = p
    return settings
