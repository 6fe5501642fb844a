"""Every setting of pmoves-e2b, read once from the environment and validated.

Each setting ``NAME`` is read from the environment variable ``NAME``, else from the file
named by ``NAME_FILE`` (stripped; PMOVES delivers secrets that way), else its default.
Secrets that are still unset are read from ``<data dir>/secrets/NAME``, where ``up``
generates them on first start. Secrets are ``SecretStr``: masked in every repr and log.
"""

from __future__ import annotations

import functools
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

# Secrets `up` generates when they are missing.
SECRET_NAMES = (
    "E2B_API_KEY",
    "E2B_MCP_SERVER_TOKEN",
    "E2B_DESKTOP_AUTH_TOKEN",
    "E2B_NATS_PASSWORD",
    "E2B_SURF_AUTH_TOKEN",
)

Port = int


class ConfigError(Exception):
    """A setting is invalid; the message names the variable and what to do (one line)."""


@dataclass(frozen=True)
class ServiceInfo:
    """One of the four HTTP services the supervisor runs."""

    key: str  # `pmoves-e2b serve <key>`
    name: str  # PMOVES service name (logs, metrics, announce)
    app: str  # "module:factory"
    port_setting: str
    health_path: str
    tier: str


SERVICES: tuple[ServiceInfo, ...] = (
    ServiceInfo("sandbox", "e2b-sandbox", "pmoves_e2b.sandbox.app:create_app", "e2b_sandbox_port", "/health", "app"),
    ServiceInfo("mcp", "e2b-mcp-server", "pmoves_e2b.mcp.app:create_app", "e2b_mcp_port", "/healthz", "llm"),
    ServiceInfo("surf", "e2b-surf", "pmoves_e2b.surf.app:create_app", "e2b_surf_port", "/api/health", "ui"),
    ServiceInfo("desktop", "e2b-desktop", "pmoves_e2b.desktop.app:create_app", "e2b_desktop_port", "/health", "ui"),
)
SERVICES_BY_KEY = {s.key: s for s in SERVICES}


def default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/pmoves-e2b")
    return Path.home() / ".local" / "share" / "pmoves-e2b"


class FileSettingsSource(PydanticBaseSettingsSource):
    """``NAME_FILE`` support: used only when ``NAME`` itself is not in the environment."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        name = field_name.upper()
        path = os.environ.get(f"{name}_FILE")
        if not path or os.environ.get(name):
            return None, field_name, False
        try:
            return Path(path).read_text().strip(), field_name, False
        except OSError as exc:
            raise ConfigError(
                f"{name}_FILE={path}: cannot read it ({exc.strerror or exc}). "
                f"Point {name}_FILE at a readable file, or unset it."
            ) from None

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for field_name, field in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(field, field_name)
            if value is not None:
                values[key] = value
        return values


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, env_ignore_empty=True, extra="ignore")

    # Secrets (generated into <data>/secrets by `up` when unset).
    e2b_api_key: SecretStr | None = None
    e2b_mcp_server_token: SecretStr | None = None
    e2b_desktop_auth_token: SecretStr | None = None
    e2b_surf_auth_token: SecretStr | None = None
    # The embedded nats-server's users derive from it (events/embedded.py); unused with NATS_URL.
    e2b_nats_password: SecretStr | None = None

    # Where things are reached (derived from the ports when unset).
    e2b_sandbox_url: str | None = None
    e2b_desktop_url: str | None = None
    # Where e2b-mcp-server reaches e2b-surf (its /surf/scrape and surf_* tools run sessions there).
    e2b_surf_url: str | None = None
    next_public_api_url: str | None = None
    agent_zero_url: str = "http://agent-zero:8080"
    # Unset: `up` runs an embedded nats-server. May carry credentials (nats://user:pass@host:4222).
    nats_url: SecretStr | None = None

    # Sandbox limits (seed defaults).
    e2b_max_sandboxes: int = Field(5, ge=1)
    e2b_sandbox_memory_mb: int = Field(2048, ge=64)
    # What all live sandboxes together may be promised; unset: the machine's physical memory.
    e2b_memory_budget_mb: int | None = Field(None, ge=64)
    e2b_sandbox_cpu_limit: float = Field(2, gt=0)
    # The sandbox's own disk (a sparse image: only what it writes takes host disk); E2B Hobby's 10 GB.
    e2b_sandbox_disk_mb: int = Field(10240, ge=64)
    e2b_sandbox_timeout_sec: int = Field(3600, ge=1)
    e2b_execution_timeout_sec: int = Field(300, ge=1)
    e2b_pool_size: int = Field(2, ge=0)  # warm sandboxes per pooled template, at least (0: no pool)
    e2b_pool_max: int = Field(8, ge=0)  # most warm sandboxes of one template when demand rises
    # More templates kept warm (custom ones, name or name:tag, comma-separated) beside the built-in ones.
    e2b_pool_templates: str = Field("", pattern=r"^[A-Za-z0-9._:, -]*$")
    # Sandboxes booting at once (default: the CPU count); creates beyond wait in a bounded queue.
    e2b_create_parallel: int | None = Field(None, ge=1)
    e2b_create_queue: int = Field(64, ge=0)
    e2b_create_queue_wait_sec: float = Field(20, gt=0)
    # envd forked into each sandbox from a pre-imported one per template (false: each starts its own)
    e2b_envd_zygote: bool = True
    # ns tier: a destroyed sandbox's netns and veth, cleaned, serve the next sandbox (false: made and
    # destroyed per sandbox)
    e2b_netns_reuse: bool = True
    # Isolation tier of sandboxes whose template and create do not choose one (sandbox/tiers.py),
    # and the tiers this service may use (comma-separated; empty: every tier this host can run).
    e2b_isolation: str = Field("ns", pattern=r"^[a-z][a-z0-9-]{0,31}$")
    e2b_isolation_tiers: str = Field("", pattern=r"^[a-z0-9, -]*$")
    # microvm tier: accelerator (auto: KVM when it boots the guest kernel, else TCG), whether creates
    # restore a saved VM per template and shape, where guest images and saved VMs are kept (default <data dir>/microvm).
    e2b_microvm_accel: str = Field("auto", pattern=r"^(auto|kvm|tcg)$")
    e2b_microvm_snapshots: bool = True
    # microvm tier: a template whose start command serves its ready port (the code interpreter) is
    # saved with that command running, so its creates restore a started server and kernels.
    e2b_microvm_warm: bool = True
    e2b_microvm_cache_dir: Path | None = None
    e2b_desktop_resolution: str = Field("1920x1080", pattern=r"^[1-9][0-9]{1,4}x[1-9][0-9]{1,4}$")
    e2b_desktop_max_duration: int = Field(3600, ge=1)
    # Desktops booted ahead (template desktop-warm, 1920x1080, kept by the warm pool: E2B_POOL_SIZE).
    e2b_desktop_warm: bool = False
    # Browser access to e2b-desktop: signed viewer links and the session cookie they set.
    e2b_desktop_link_ttl: int = Field(600, ge=10)
    e2b_desktop_session_ttl: int = Field(8 * 3600, ge=60)
    # noVNC's core/ + vendor/ (default: fetched by `make novnc` into the package; Debian's /usr/share/novnc works).
    e2b_novnc_dir: Path | None = None
    e2b_surf_concurrent: int = Field(5, ge=1)
    e2b_surf_timeout: int = Field(60, ge=1)
    # Desktops kept made with Chromium attached, for a fast first page (each holds a sandbox).
    e2b_surf_warm_desktops: int = Field(0, ge=0, le=10)
    # e2b-surf agent mode: the model ("provider:model", see surf/agent/providers), where each
    # provider is reached, its key (the providers' usual variable names), and the run's limits.
    e2b_surf_model: str = "openai:computer-use-preview"
    e2b_surf_openai_base_url: str = "https://api.openai.com/v1"
    e2b_surf_anthropic_base_url: str = "https://api.anthropic.com"
    e2b_surf_chat_base_url: str | None = None
    openai_api_key: SecretStr | None = None
    anthropic_api_key: SecretStr | None = None
    e2b_surf_chat_api_key: SecretStr | None = None
    e2b_surf_model_timeout: float = Field(120, gt=0)
    e2b_surf_max_steps: int = Field(30, ge=1, le=500)
    # Browser access to e2b-surf: the login cookie, and signed URLs of result files.
    e2b_surf_session_ttl: int = Field(8 * 3600, ge=60)
    e2b_surf_file_url_ttl: int = Field(3600, ge=10)
    e2b_spells_timeout: int = Field(300, ge=1)
    e2b_spells_max_memory: int = Field(1024, ge=64)
    e2b_debug: bool = False
    e2b_telemetry_disabled: bool = True

    # Network.
    e2b_bind: str = "127.0.0.1"
    e2b_domain: str = "e2b.localhost"
    # Extra Host names the MCP endpoints accept (comma-separated, `host` or `host:port`);
    # loopback is always allowed. The SDK's DNS-rebinding check refuses any other Host/Origin.
    e2b_mcp_allowed_hosts: str = "e2b-mcp-server"
    e2b_sandbox_port: Port = Field(7070, ge=1, le=65535)
    e2b_sandbox_tls_port: Port = Field(7443, ge=1, le=65535)
    e2b_mcp_port: Port = Field(7073, ge=1, le=65535)
    e2b_surf_port: Port = Field(3080, ge=1, le=65535)
    e2b_desktop_port: Port = Field(6080, ge=1, le=65535)
    e2b_nats_port: Port = Field(4222, ge=1, le=65535)
    e2b_nats_monitor_port: Port = Field(8222, ge=1, le=65535)

    # Storage (templates/spells/database default to paths inside the data dir).
    e2b_data_dir: Path = Field(default_factory=default_data_dir)
    e2b_templates_dir: Path | None = None
    e2b_spells_dir: Path | None = None
    e2b_database_url: str | None = None
    # Templates also in S3/MinIO (s3://bucket/prefix; the templates dir is then the local cache).
    # Unset keys: boto3's own chain (AWS_ACCESS_KEY_ID, ~/.aws, instance roles).
    e2b_template_store: str | None = None
    e2b_s3_endpoint_url: str | None = None
    e2b_s3_region: str | None = None
    e2b_s3_access_key_id: str | None = None
    e2b_s3_secret_access_key: SecretStr | None = None

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "text"] = "json"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, FileSettingsSource(settings_cls)

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _normalise_case(cls, value: Any, info: Any) -> Any:
        if not isinstance(value, str):
            return value
        return value.upper() if info.field_name == "log_level" else value.lower()

    @model_validator(mode="after")
    def _derive_defaults(self) -> Settings:
        data = self.e2b_data_dir = self.e2b_data_dir.expanduser().absolute()
        self.e2b_templates_dir = (self.e2b_templates_dir or data / "templates").expanduser().absolute()
        self.e2b_spells_dir = (self.e2b_spells_dir or data / "spells").expanduser().absolute()
        self.e2b_database_url = self.e2b_database_url or f"sqlite:///{data / 'pmoves-e2b.db'}"
        self.e2b_sandbox_url = self.e2b_sandbox_url or f"http://localhost:{self.e2b_sandbox_port}"
        self.e2b_desktop_url = self.e2b_desktop_url or f"http://localhost:{self.e2b_desktop_port}"
        self.e2b_surf_url = self.e2b_surf_url or f"http://localhost:{self.e2b_surf_port}"
        self.next_public_api_url = self.next_public_api_url or f"http://localhost:{self.e2b_surf_port}"
        for name in SECRET_NAMES:
            field = name.lower()
            if getattr(self, field) is None:
                stored = read_secret_file(self.secrets_dir / name)
                if stored:
                    setattr(self, field, SecretStr(stored))
        self._check_distinct_ports()
        return self

    def _check_distinct_ports(self) -> None:
        seen: dict[int, str] = {}
        for field in self.listen_port_fields():
            port = getattr(self, field)
            if port in seen:
                raise ValueError(
                    f"{field.upper()} and {seen[port].upper()} are both {port}; give each service its own port"
                )
            seen[port] = field

    def listen_port_fields(self) -> list[str]:
        fields = [s.port_setting for s in SERVICES] + ["e2b_sandbox_tls_port"]
        if self.nats_url is None:
            fields += ["e2b_nats_port", "e2b_nats_monitor_port"]
        return fields

    # Derived paths and URLs.
    @property
    def public_domain(self) -> str:
        """The domain SDKs build ``{port}-{id}.{domain}`` hosts from: the TLS listener's (port included)."""
        port = self.e2b_sandbox_tls_port
        return self.e2b_domain if port == 443 else f"{self.e2b_domain}:{port}"

    @property
    def secrets_dir(self) -> Path:
        return self.e2b_data_dir / "secrets"

    @property
    def run_dir(self) -> Path:
        return self.e2b_data_dir / "run"

    @property
    def logs_dir(self) -> Path:
        return self.e2b_data_dir / "logs"

    @property
    def nats_store_dir(self) -> Path:
        return self.e2b_data_dir / "nats"

    @property
    def embedded_nats(self) -> bool:
        return self.nats_url is None

    @property
    def nats_server_url(self) -> str:
        """``NATS_URL`` (may contain credentials: never log it), else the embedded server's address
        (without credentials: clients get theirs from ``events.embedded.client_url``)."""
        if self.nats_url is not None:
            return self.nats_url.get_secret_value()
        return f"nats://127.0.0.1:{self.e2b_nats_port}"

    def service_port(self, service: ServiceInfo) -> int:
        return int(getattr(self, service.port_setting))

    def service_url(self, service: ServiceInfo) -> str:
        """Base URL to reach a service from this host."""
        host = "127.0.0.1" if self.e2b_bind in ("0.0.0.0", "::", "") else self.e2b_bind  # noqa: S104 - compares, does not bind
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.service_port(service)}"

    def secret(self, name: str) -> str | None:
        value = getattr(self, name.lower())
        return value.get_secret_value() if value is not None else None


def read_secret_file(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"cannot read generated secret {path} ({exc.strerror or exc}); fix its permissions") from None


def _format_validation_error(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "__root__"]
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if not loc:
        return f"invalid configuration: {msg}"
    name = loc[0].upper()
    default = Settings.model_fields.get(loc[0])
    hint = f" (default {default.default})" if default is not None and default.default is not None else ""
    shown = "" if name in SECRET_NAMES or name == "NATS_URL" else f"={first.get('input')!r}"
    return f"{name}{shown} is invalid: {msg}. Fix or unset {name}{hint}."


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, turning any validation problem into a one-line ConfigError."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()


SHARED_TEMPLATES_DIR = Path("/var/lib/pmoves-e2b/templates")


def templates_dir() -> Path:
    """E2B_TEMPLATES_DIR as the services see it (it honours E2B_DATA_DIR). A setting that only the
    services need must not stop a template build: if the settings do not load, the variable alone."""
    try:
        configured = get_settings().e2b_templates_dir
        if configured is not None:
            return configured
    except Exception:  # noqa: BLE001, S110 - see above; the services report the broken setting
        pass
    return Path(os.environ.get("E2B_TEMPLATES_DIR") or SHARED_TEMPLATES_DIR)


def contracts_dir_override() -> Path | None:
    """PMOVES_CONTRACTS_DIR (PMOVES' variable): another contracts directory for events/schemas.py."""
    configured = os.environ.get("PMOVES_CONTRACTS_DIR")
    return Path(configured) if configured else None


def generate_secret(name: str) -> str:
    # E2B cloud keys look like e2b_ + 40 hex; the SDK accepts any string, PMOVES checks the shape.
    if name == "E2B_API_KEY":
        return "e2b_" + secrets.token_hex(20)
    return secrets.token_hex(32)


def ensure_secrets(settings: Settings) -> dict[str, Path | None]:
    """Create missing secret files (mode 0600). Returns name -> file path (None: set by env)."""
    settings.secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths: dict[str, Path | None] = {}
    for name in SECRET_NAMES:
        path = settings.secrets_dir / name
        env_given = bool(os.environ.get(name) or os.environ.get(f"{name}_FILE"))
        if env_given:
            paths[name] = None
            continue
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(generate_secret(name) + "\n")
        paths[name] = path
    return paths
