"""Configuration: frozen value objects loaded from TOML, overridden from the environment,
validated once at start-up.

Every error names the offending key (``server.listen: ...``) so that a bad deployment fails
at once with a message an operator can act on, not later with a stack trace.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from gitcache.config_values import (
    ConfigError,
    parse_bool,
    parse_choice,
    parse_duration,
    parse_int,
    parse_level,
    parse_listen,
    parse_repo_list,
    parse_size,
    parse_str,
    parse_upstream_url,
    read_secret,
    require_public,
)
from gitcache.paths import StatePaths

__all__ = ["Config", "ConfigError", "config_from_dict", "dump_config", "load_config"]

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_STATE_DIR = "/var/lib/gitcache"
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_FETCH_INTERVAL = 60.0
DEFAULT_CLONE_TIMEOUT = 3600.0
DEFAULT_FETCH_TIMEOUT = 600.0
DEFAULT_GIT_TIMEOUT = 60.0
DEFAULT_ZSTD_LEVEL = 3
DEFAULT_ZSTD_THREADS = 0
DEFAULT_DISK_MAX_SIZE = 50 * 1024**3
DEFAULT_LOG_LEVEL = "INFO"
DEFAULT_KEEP = 2
DEFAULT_SCRUB_INTERVAL = 86400.0
DEFAULT_SCRUB_RATE = 32 * 1024**2
DEFAULT_EVICT_AFTER = 30 * 86400.0
DEFAULT_MAINTENANCE_INTERVAL = 86400.0
DEFAULT_ARCHIVE_INTERVAL = 6 * 3600.0
DEFAULT_REFRESH_INTERVAL = 600.0
DEFAULT_IDLE_AFTER = 7 * 86400.0
DEFAULT_REFRESH_CONCURRENCY = 4
DEFAULT_STALE_IF_ERROR = 86400.0
DEFAULT_BACKOFF_MAX = 3600.0
DEFAULT_USERNAME = "x-access-token"
DEFAULT_AUTH_TTL = 60.0
DEFAULT_MAX_GENERATIONS = 16
DEFAULT_MAX_CLIENTS_PER_GENERATION = 256
DEFAULT_DISK_MIN_FREE = 1024**3
DEFAULT_S3_REGION = "us-east-1"
DEFAULT_S3_PART_SIZE = 16 * 1024**2
DEFAULT_S3_UPLOAD_CONCURRENCY = 4
DEFAULT_S3_REDIRECT_TTL = 300.0
MIN_S3_PART_SIZE = 5 * 1024**2  # S3's own minimum for every part but the last

ENV_CONFIG = "GITCACHE_CONFIG"
ENV_PREFIX = "GITCACHE_"


@dataclass(frozen=True)
class ServerConfig:
    listen: str = DEFAULT_LISTEN
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    max_generations: int = DEFAULT_MAX_GENERATIONS
    max_clients_per_generation: int = DEFAULT_MAX_CLIENTS_PER_GENERATION
    drain_delay: float = 0.0
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    @property
    def paths(self) -> StatePaths:
        return StatePaths(self.state_dir)

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


@dataclass(frozen=True)
class MirrorsConfig:
    fetch_interval: float = DEFAULT_FETCH_INTERVAL
    clone_timeout: float = DEFAULT_CLONE_TIMEOUT
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT
    git_timeout: float = DEFAULT_GIT_TIMEOUT
    evict_after: float = DEFAULT_EVICT_AFTER
    maintenance_interval: float = DEFAULT_MAINTENANCE_INTERVAL
    archive_interval: float = DEFAULT_ARCHIVE_INTERVAL  # 0: no mirror archives


@dataclass(frozen=True)
class RefreshConfig:
    interval: float = DEFAULT_REFRESH_INTERVAL
    idle_after: float = DEFAULT_IDLE_AFTER
    concurrency: int = DEFAULT_REFRESH_CONCURRENCY
    stale_if_error: float = DEFAULT_STALE_IF_ERROR
    backoff_max: float = DEFAULT_BACKOFF_MAX
    pinned: tuple[str, ...] = ()


@dataclass(frozen=True)
class HookConfig:
    """A webhook receiver; ``secret`` is read from ``secret_env`` or ``secret_file`` at
    load time and never printed."""

    host: str
    secret_env: str = ""
    secret_file: str = ""
    secret: str = field(default="", repr=False)


@dataclass(frozen=True)
class SnapshotConfig:
    zstd_level: int = DEFAULT_ZSTD_LEVEL
    zstd_threads: int = DEFAULT_ZSTD_THREADS


@dataclass(frozen=True)
class DiskCacheConfig:
    max_size: int = DEFAULT_DISK_MAX_SIZE
    min_free: int = DEFAULT_DISK_MIN_FREE


@dataclass(frozen=True)
class S3CacheConfig:
    """Credentials come from the standard AWS chain (environment, profile, instance
    role), never from this file."""

    bucket: str = ""
    prefix: str = ""
    endpoint_url: str = ""
    region: str = DEFAULT_S3_REGION
    part_size: int = DEFAULT_S3_PART_SIZE
    upload_concurrency: int = DEFAULT_S3_UPLOAD_CONCURRENCY
    redirect: bool = False
    redirect_ttl: float = DEFAULT_S3_REDIRECT_TTL


@dataclass(frozen=True)
class AuthConfig:
    tokens_file: str = ""


@dataclass(frozen=True)
class CacheConfig:
    backend: str = "disk"
    keep: int = DEFAULT_KEEP
    scrub_interval: float = DEFAULT_SCRUB_INTERVAL  # 0: no background scrub
    scrub_rate: int = DEFAULT_SCRUB_RATE  # bytes per second
    disk: DiskCacheConfig = field(default_factory=DiskCacheConfig)
    s3: S3CacheConfig = field(default_factory=S3CacheConfig)


@dataclass(frozen=True)
class UpstreamConfig:
    """An upstream host. Its credentials are read from ``token_env`` or ``token_file`` at
    load time (never from the config file itself) and never printed."""

    host: str
    url: str
    username: str = DEFAULT_USERNAME
    token_env: str = ""
    token_file: str = ""
    auth: str = "none"
    auth_ttl: float = DEFAULT_AUTH_TTL
    allow_private: bool = False
    token: str = field(default="", repr=False)

    def url_for(self, repo: str) -> str:
        return self.url.replace("{repo}", repo)

    @property
    def passthrough(self) -> bool:
        return self.auth == "passthrough"


@dataclass(frozen=True)
class LogConfig:
    level: str = DEFAULT_LOG_LEVEL
    format: str = "text"


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    mirrors: MirrorsConfig = field(default_factory=MirrorsConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    log: LogConfig = field(default_factory=LogConfig)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    upstreams: Mapping[str, UpstreamConfig] = field(default_factory=dict)
    hooks: Mapping[str, HookConfig] = field(default_factory=dict)


# --- loading -------------------------------------------------------------------------------

_T = TypeVar("_T")
_SECTIONS: dict[str, dict[str, Callable[[object], object]]] = {
    "server": {
        "listen": parse_listen,
        "state_dir": lambda v: Path(parse_str(v)),
        "shutdown_timeout": parse_duration,
        "max_generations": parse_int(1, 10_000),
        "max_clients_per_generation": parse_int(1, 100_000),
        "drain_delay": parse_duration,
        "header_timeout": parse_duration,
        "max_connections": parse_int(1, 1_000_000),
    },
    "mirrors": {
        "fetch_interval": parse_duration,
        "clone_timeout": parse_duration,
        "fetch_timeout": parse_duration,
        "git_timeout": parse_duration,
        "evict_after": parse_duration,
        "maintenance_interval": parse_duration,
        "archive_interval": parse_duration,
    },
    "refresh": {
        "interval": parse_duration,
        "idle_after": parse_duration,
        "concurrency": parse_int(1, 64),
        "stale_if_error": parse_duration,
        "backoff_max": parse_duration,
        "pinned": parse_repo_list,
    },
    "snapshot": {"zstd_level": parse_int(-7, 22), "zstd_threads": parse_int(-1, 64)},
    "cache": {
        "backend": parse_choice("disk", "s3", "tiered"),
        "keep": parse_int(1, 1000),
        "scrub_interval": parse_duration,
        "scrub_rate": parse_size,
    },
    "cache.s3": {
        "bucket": parse_str,
        "prefix": lambda v: str(v) if isinstance(v, str) else parse_str(v),
        "endpoint_url": parse_str,
        "region": parse_str,
        "part_size": parse_size,
        "upload_concurrency": parse_int(1, 64),
        "redirect": parse_bool,
        "redirect_ttl": parse_duration,
    },
    "cache.disk": {"max_size": parse_size, "min_free": parse_size},
    "auth": {"tokens_file": parse_str},
    "log": {"level": parse_level, "format": parse_choice("text", "json")},
}
_UPSTREAM_KEYS: dict[str, Callable[[object], object]] = {
    "url": parse_upstream_url,
    "username": parse_str,
    "token_env": parse_str,
    "token_file": parse_str,
    "auth": parse_choice("none", "passthrough"),
    "auth_ttl": parse_duration,
    "allow_private": parse_bool,
}
_HOOK_KEYS: dict[str, Callable[[object], object]] = {
    "host": parse_str,
    "secret_env": parse_str,
    "secret_file": parse_str,
}
HOOK_KINDS = {"github": "github.com", "gitlab": "gitlab.com"}


def _build(cls: type[_T], name: str, table: object, **extra: object) -> _T:
    if not isinstance(table, dict):
        raise ConfigError(f"{name}: expected a table")
    if name in _SECTIONS:
        parsers = _SECTIONS[name]
    else:
        parsers = _HOOK_KEYS if name.startswith("hooks.") else _UPSTREAM_KEYS
    allowed = parsers.keys() | (extra.keys() - {"host"})  # nested tables come as extra
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{name}.{key}: unknown key")
    values: dict[str, Any] = dict(extra)
    for key, parse in parsers.items():
        if key in table:
            try:
                values[key] = parse(table[key])
            except ValueError as exc:
                raise ConfigError(f"{name}.{key}: {exc}") from None
    return cls(**values)


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    """``GITCACHE_SERVER_LISTEN=…`` overrides ``[server] listen``, and so on for every
    scalar key of every section; nested sections join with ``_``
    (``GITCACHE_CACHE_DISK_MAX_SIZE``)."""
    for section, parsers in _SECTIONS.items():
        for key in parsers:
            env = ENV_PREFIX + f"{section}_{key}".replace(".", "_").upper()
            if env in environ:
                table = data
                for part in section.split("."):
                    table = table.setdefault(part, {})
                raw = environ[env]
                table[key] = int(raw) if re.fullmatch(r"-?\d+", raw) else raw


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Load ``path`` (or ``$GITCACHE_CONFIG``, or the embedded default), apply environment
    overrides, validate, and return the frozen config."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get(ENV_CONFIG):
        path = Path(environ[ENV_CONFIG])
    try:
        if path is None:
            text = resources.files("gitcache").joinpath("default.toml").read_text("utf-8")
        else:
            text = path.read_text("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path or 'default config'}: {exc}") from None
    return config_from_dict(data, environ)


def config_from_dict(data: dict[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed TOML document (tests build configs this way)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    _apply_env(data, environ or {})
    for key in data:
        if key not in {
            "server",
            "mirrors",
            "snapshot",
            "cache",
            "log",
            "refresh",
            "auth",
            "upstreams",
            "hooks",
        }:
            raise ConfigError(f"{key}: unknown section")
    cache_table = data.get("cache", {})
    if not isinstance(cache_table, dict):
        raise ConfigError("cache: expected a table")
    disk = _build(DiskCacheConfig, "cache.disk", cache_table.get("disk", {}))
    s3 = _build(S3CacheConfig, "cache.s3", cache_table.get("s3", {}))
    backend = cache_table.get("backend")
    if backend in ("s3", "tiered") and not s3.bucket:
        raise ConfigError(f"cache.s3.bucket: required with backend = {backend!r}")
    if "scrub_rate" in cache_table and parse_size(cache_table["scrub_rate"]) < 1024:
        raise ConfigError("cache.scrub_rate: must be at least 1KiB (per second)")
    if s3.part_size < MIN_S3_PART_SIZE:
        raise ConfigError("cache.s3.part_size: must be at least 5MiB (S3's minimum)")
    upstreams: dict[str, UpstreamConfig] = {}
    raw_upstreams = data.get("upstreams", {})
    if not isinstance(raw_upstreams, dict):
        raise ConfigError("upstreams: expected a table of hosts")
    for host, table in raw_upstreams.items():
        if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?(:\d{1,5})?", host):
            raise ConfigError(f"upstreams.{host}: not a lower-case host name")
        if not isinstance(table, dict) or "url" not in table:
            raise ConfigError(f"upstreams.{host}.url: missing")
        upstream = _build(UpstreamConfig, f"upstreams.{host}", table, host=host)
        if not upstream.allow_private:
            require_public(f"upstreams.{host}", host, upstream.url)
        token = ""
        if upstream.token_env or upstream.token_file:
            token = read_secret(
                f"upstreams.{host}", "token", upstream.token_env, upstream.token_file, environ
            )
        upstreams[host] = dataclasses.replace(upstream, token=token)
    if not upstreams:
        raise ConfigError("upstreams: at least one upstream host must be configured")
    hooks: dict[str, HookConfig] = {}
    raw_hooks = data.get("hooks", {})
    if not isinstance(raw_hooks, dict):
        raise ConfigError("hooks: expected a table")
    for kind, table in raw_hooks.items():
        if kind not in HOOK_KINDS:
            raise ConfigError(f"hooks.{kind}: unknown hook, expected one of {sorted(HOOK_KINDS)}")
        hook = _build(HookConfig, f"hooks.{kind}", {"host": HOOK_KINDS[kind], **table})
        secret = read_secret(f"hooks.{kind}", "secret", hook.secret_env, hook.secret_file, environ)
        hooks[kind] = dataclasses.replace(hook, secret=secret)
        if hook.host not in upstreams:
            raise ConfigError(f"hooks.{kind}.host: {hook.host!r} is not a configured upstream")
    refresh = _build(RefreshConfig, "refresh", data.get("refresh", {}))
    for pinned in refresh.pinned:
        if pinned.split("/", 1)[0] not in upstreams:
            raise ConfigError(f"refresh.pinned: {pinned!r} is not on a configured upstream")
    return Config(
        refresh=refresh,
        hooks=hooks,
        auth=_build(AuthConfig, "auth", data.get("auth", {})),
        server=_build(ServerConfig, "server", data.get("server", {})),
        mirrors=_build(MirrorsConfig, "mirrors", data.get("mirrors", {})),
        snapshot=_build(SnapshotConfig, "snapshot", data.get("snapshot", {})),
        cache=_build(CacheConfig, "cache", cache_table, disk=disk, s3=s3),
        log=_build(LogConfig, "log", data.get("log", {})),
        upstreams=upstreams,
    )


def dump_config(config: Config) -> str:
    """The effective configuration as TOML, for ``gitcache check-config``."""
    lines: list[str] = []

    def emit(header: str, obj: object) -> None:
        lines.append(f"[{header}]")
        for f in dataclasses.fields(obj):  # type: ignore[arg-type]
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value) or f.name in ("host", "secret", "token"):
                continue
            lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")

    emit("server", config.server)
    emit("mirrors", config.mirrors)
    emit("snapshot", config.snapshot)
    emit("cache", config.cache)
    emit("cache.disk", config.cache.disk)
    emit("cache.s3", config.cache.s3)
    emit("log", config.log)
    emit("refresh", config.refresh)
    emit("auth", config.auth)
    for host, upstream in config.upstreams.items():
        emit(f'upstreams."{host}"', upstream)
    for kind, hook in config.hooks.items():
        emit(f"hooks.{kind}", hook)
        lines.insert(-1, f"host = {_toml_value(hook.host)}")
    return "\n".join(lines)


def _toml_value(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
