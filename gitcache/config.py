"""Configuration: every setting declared once, below, as a typed pydantic field with its
default, its bounds and its help text. From those declarations come the validation, the
environment overrides, ``gitcache check-config``'s output (which loads back) and the
README's configuration table, all in :mod:`gitcache.settings` (``python -m
gitcache.settings`` prints the table).

Why pydantic and not pydantic-settings: the environment names gitcache documents,
``GITCACHE_CACHE_DISK_MAX_SIZE``, join sections and keys with the same ``_`` that keys
contain, which pydantic-settings' nested parsing cannot split, and it ignores a misspelt
variable where gitcache must refuse it. The names are derived from the same fields here.

Every error names the offending key (``server.listen: ...``), so a bad deployment fails at
once with a message an operator can act on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gitcache.config_values import (
    ConfigError,
    parse_duration,
    parse_listen,
    parse_repo_list,
    parse_size,
    parse_upstream_url,
    read_secret,
    require_public,
)
from gitcache.paths import StatePaths

__all__ = ["Config", "ConfigError", "Section"]

Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]


def seconds(text: str) -> float:
    """A default duration, written as a person would (``"30s"``)."""
    return parse_duration(text)


def size(text: str) -> int:
    """A default size, written as a person would (``"50GiB"``)."""
    return parse_size(text)


Listen = Annotated[str, AfterValidator(parse_listen)]
Level = Annotated[
    Literal["DEBUG", "INFO", "WARNING", "ERROR"],
    BeforeValidator(lambda v: v.upper() if isinstance(v, str) else v),
]
MIN_S3_PART_SIZE = 5 * 1024**2  # S3's own minimum for every part but the last
HOOK_HOSTS = {"github": "github.com", "gitlab": "gitlab.com"}
_HOST = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?(:\d{1,5})?")


def _at_least(low: int, text: str) -> Callable[[int], int]:
    def check(value: int) -> int:
        if value < low:
            raise ValueError(f"must be at least {text}")
        return value

    return check


class Section(BaseModel):
    # Defaults are written as a person would ("30s") and validated like any value.
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class ServerConfig(Section):
    listen: Listen = Field("127.0.0.1:8080", description="address and port")
    state_dir: Path = Field(
        Path(".gitcache"),
        description="mirrors, cache entries, spools; relative to the working directory",
    )
    shutdown_timeout: Duration = Field(
        seconds("30s"), description="how long running responses may finish on SIGTERM"
    )
    drain_delay: Duration = Field(
        seconds("0s"),
        description="after SIGTERM, how long `/readyz` answers 503 while connections are "
        "still accepted (set it to your load balancer's probe interval)",
    )
    max_generations: StrictInt = Field(
        16, ge=1, le=10_000, description="snapshot generations at once; past it a 503"
    )
    max_git_requests: StrictInt = Field(
        64,
        ge=1,
        le=10_000,
        description="git requests the mirror answers one by one at once (ref listings, "
        "negotiation rounds); past it a 503",
    )
    max_clients_per_generation: StrictInt = Field(
        256, ge=1, le=100_000, description="clients streaming one generation at once; past it a 503"
    )
    header_timeout: Duration = Field(
        seconds("10s"),
        description="a connection that has not sent a complete request head this long "
        "after it opened (or after its last response) is closed",
    )
    max_connections: StrictInt = Field(
        4096,
        ge=1,
        le=1_000_000,
        description="open connections at once; past it a new one gets a 503 and is closed",
    )

    @property
    def paths(self) -> StatePaths:
        return StatePaths(self.state_dir)

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class MirrorsConfig(Section):
    fetch_interval: Duration = Field(
        seconds("1m"), description="a mirror older than this is fetched before a snapshot is served"
    )
    clone_timeout: Duration = Field(seconds("1h"), description="limit for a first clone")
    fetch_timeout: Duration = Field(seconds("10m"), description="limit for a fetch")
    git_timeout: Duration = Field(seconds("1m"), description="limit for every other git call")
    evict_after: Duration = Field(
        seconds("30d"),
        description="mirrors of repositories not requested for this long are deleted",
    )
    maintenance_interval: Duration = Field(
        seconds("1d"),
        description="geometric repack with bitmaps, commit-graph, stale lock removal, "
        "`fsck --connectivity-only` (a damaged mirror is re-cloned and swapped in)",
    )
    archive_interval: Duration = Field(
        seconds("6h"),
        description="with an S3 bucket: how often each mirror whose refs moved is archived "
        "into it (by one replica), so a replica without it restores it instead of cloning; "
        "`0`: no archives",
    )


class RefreshConfig(Section):
    interval: Duration = Field(
        seconds("10m"), description="requested repositories are fetched this often, ±10% jitter"
    )
    idle_after: Duration = Field(
        seconds("7d"), description="repositories not requested for this long stop being refreshed"
    )
    concurrency: StrictInt = Field(
        4, ge=1, le=64, description="refresh jobs at once (one per repository at most)"
    )
    stale_if_error: Duration = Field(
        seconds("24h"), description="oldest snapshot served (as `stale`) when the upstream fails"
    )
    backoff_max: Duration = Field(
        seconds("1h"),
        description="a failing upstream is retried after interval x 2ⁿ⁻¹, capped here",
    )
    pinned: Annotated[tuple[str, ...], BeforeValidator(parse_repo_list)] = Field(
        (),
        description='`"host/repo"` list, cloned at start-up and kept fresh whether requested '
        "or not",
    )


class SnapshotConfig(Section):
    zstd_level: StrictInt = Field(3, ge=-7, le=22, description="-7 (fastest) … 22 (smallest)")
    zstd_threads: StrictInt = Field(
        0, ge=-1, le=64, description="0: one compression thread; N: N workers; -1: one per core"
    )
    keep_trees: StrictInt = Field(
        4,
        ge=0,
        le=1000,
        description="compressed working trees kept per repository (the newest used), which "
        "the snapshots of one commit share; `0`: none",
    )


class DiskCacheConfig(Section):
    max_size: Size = Field(
        size("50GiB"), description="least-recently-used entries are evicted beyond this"
    )
    min_free: Size = Field(
        size("1GiB"),
        description="below this much free space, new snapshots stream but are not cached",
    )


class S3CacheConfig(Section):
    """Credentials come from the standard AWS chain (environment, profile, instance role),
    never from this file."""

    bucket: str = Field("", description='required with `backend = "s3"` or `"tiered"`')
    prefix: str = Field("", description="key prefix for everything gitcache writes")
    endpoint_url: str = Field(
        "", description="an S3-compatible endpoint (MinIO, Ceph, …); empty: AWS"
    )
    region: str = Field("us-east-1", min_length=1, description="the bucket's region")
    part_size: Annotated[
        Size, AfterValidator(_at_least(MIN_S3_PART_SIZE, "5MiB (S3's minimum)"))
    ] = Field(
        size("16MiB"),
        description="multipart part size (at least 5 MiB); a part leaves as soon as the spool "
        "has grown by this much",
    )
    upload_concurrency: StrictInt = Field(
        4, ge=1, le=64, description="parts in flight (read from the spool, not held in memory)"
    )
    redirect: StrictBool = Field(
        False,
        description='with `backend = "s3"`: answer a whole-file hit with a 302 to a presigned '
        "URL, so the bytes bypass the proxy",
    )
    redirect_ttl: Duration = Field(seconds("5m"), description="lifetime of those URLs")


class CacheConfig(Section):
    backend: Literal["disk", "s3", "tiered"] = Field(
        "disk",
        description='`"disk"`; `"s3"` (a bucket replicas share); `"tiered"` (disk in front of S3)',
    )
    keep: StrictInt = Field(2, ge=1, le=1000, description="snapshots kept per repository and ref")
    keep_packs: StrictInt = Field(
        64,
        ge=1,
        le=10000,
        description="cached upload-pack responses kept per repository, the newest (they share "
        "the repository's manifest)",
    )
    scrub_interval: Duration = Field(
        seconds("1d"),
        description="how often every cached snapshot, on every tier, is read back and hashed "
        "against its entry (a mismatch is evicted); `0`: never",
    )
    scrub_rate: Annotated[Size, AfterValidator(_at_least(1024, "1KiB (a second)"))] = Field(
        size("32MiB"), description="bytes the scrub reads a second, at most"
    )
    disk: DiskCacheConfig = DiskCacheConfig()
    s3: S3CacheConfig = S3CacheConfig()


class AuthConfig(Section):
    tokens_file: str = Field(
        "", description="TOML file of inbound tokens (see *Security*); empty: no inbound auth"
    )


class LogConfig(Section):
    level: Level = Field("INFO", description="`DEBUG`, `INFO`, `WARNING`, `ERROR`")
    format: Literal["text", "json"] = Field(
        "text", description="`text` or `json` (one JSON object a line)"
    )


class UpstreamConfig(Section):
    """An upstream host. Its credentials are read from ``token_env`` or ``token_file`` at
    load time (never from the config file itself) and never printed."""

    host: str = Field("", exclude=True)  # the table's name, filled in by Config
    url: Annotated[str, AfterValidator(parse_upstream_url)] = Field(
        description="URL template, `{repo}` is the path after the host, e.g. "
        '`"https://github.com/{repo}.git"`; only listed hosts are served'
    )
    username: str = Field("x-access-token", description="username sent with the token")
    token_env: str = Field(
        "", description="environment variable holding gitcache's own credential for it"
    )
    token_file: str = Field("", description="… or a file holding it (at most one of the two)")
    auth: Literal["none", "passthrough"] = Field(
        "none", description='`"passthrough"`: check each client\'s own credentials upstream'
    )
    auth_ttl: Duration = Field(
        seconds("60s"), description="how long a pass-through allow is remembered"
    )
    allow_private: StrictBool = Field(
        False,
        description="allow an IP literal, `localhost` or `file://` in the host or URL "
        "(refused otherwise: no open proxy into the local network)",
    )
    token: str = Field("", exclude=True, repr=False)

    def url_for(self, repo: str) -> str:
        return self.url.replace("{repo}", repo)

    @property
    def passthrough(self) -> bool:
        return self.auth == "passthrough"


class HookConfig(Section):
    """A webhook receiver; ``secret`` is read from ``secret_env`` or ``secret_file`` at
    load time and never printed."""

    host: str = Field(
        description='the upstream whose pushes it reports: `"github.com"` for `github`, '
        '`"gitlab.com"` for `gitlab`'
    )
    secret_env: str = Field("", description="environment variable holding the secret")
    secret_file: str = Field("", description="… or a file holding it (exactly one of the two)")
    secret: str = Field("", exclude=True, repr=False)


class Config(Section):
    server: ServerConfig = ServerConfig()
    mirrors: MirrorsConfig = MirrorsConfig()
    snapshot: SnapshotConfig = SnapshotConfig()
    cache: CacheConfig = CacheConfig()
    log: LogConfig = LogConfig()
    refresh: RefreshConfig = RefreshConfig()
    auth: AuthConfig = AuthConfig()
    upstreams: dict[str, UpstreamConfig] = {}
    hooks: dict[str, HookConfig] = {}

    @model_validator(mode="before")
    @classmethod
    def _name_tables(cls, data: Any) -> Any:
        """An upstream's host is its table's name; a hook's host defaults by its kind."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        upstreams, hooks = data.get("upstreams"), data.get("hooks")
        if isinstance(upstreams, dict):
            data["upstreams"] = {
                h: {**t, "host": h} if isinstance(t, dict) else t for h, t in upstreams.items()
            }
        if isinstance(hooks, dict):
            data["hooks"] = {
                k: {"host": HOOK_HOSTS.get(str(k), ""), **t} if isinstance(t, dict) else t
                for k, t in hooks.items()
            }
        return data

    @field_validator("upstreams")
    @classmethod
    def _check_upstreams(
        cls, upstreams: dict[str, UpstreamConfig], info: ValidationInfo
    ) -> dict[str, UpstreamConfig]:
        if not upstreams:
            raise ValueError("at least one upstream host must be configured")
        environ = _environ(info)
        checked = {}
        for host, upstream in upstreams.items():
            if not _HOST.fullmatch(host):
                raise ConfigError(f"upstreams.{host}: not a lower-case host name")
            if not upstream.allow_private:
                require_public(f"upstreams.{host}", host, upstream.url)
            token = ""
            if upstream.token_env or upstream.token_file:
                token = read_secret(
                    f"upstreams.{host}", "token", upstream.token_env, upstream.token_file, environ
                )
            checked[host] = upstream.model_copy(update={"token": token})
        return checked

    @field_validator("hooks")
    @classmethod
    def _check_hooks(cls, hooks: dict[str, HookConfig]) -> dict[str, HookConfig]:
        for kind in hooks:
            if kind not in HOOK_HOSTS:
                raise ConfigError(
                    f"hooks.{kind}: unknown hook, expected one of {sorted(HOOK_HOSTS)}"
                )
        return hooks

    @model_validator(mode="after")
    def _check_across_sections(self, info: ValidationInfo) -> Config:
        backend = self.cache.backend
        if backend in ("s3", "tiered") and not self.cache.s3.bucket:
            raise ConfigError(f"cache.s3.bucket: required with backend = {backend!r}")
        for pinned in self.refresh.pinned:
            if pinned.split("/", 1)[0] not in self.upstreams:
                raise ConfigError(f"refresh.pinned: {pinned!r} is not on a configured upstream")
        hooks = {}
        for kind, hook in self.hooks.items():
            if hook.host not in self.upstreams:
                raise ConfigError(f"hooks.{kind}.host: {hook.host!r} is not a configured upstream")
            secret = read_secret(
                f"hooks.{kind}", "secret", hook.secret_env, hook.secret_file, _environ(info)
            )
            hooks[kind] = hook.model_copy(update={"secret": secret})
        object.__setattr__(self, "hooks", hooks)
        return self

    def secret_names(self) -> set[str]:
        """The environment variables this config reads secrets from."""
        names = {u.token_env for u in self.upstreams.values()}
        names |= {h.secret_env for h in self.hooks.values()}
        return names - {""}


def _environ(info: ValidationInfo) -> Mapping[str, str]:
    context = info.context or {}
    environ: Mapping[str, str] = context.get("environ", {})
    return environ
