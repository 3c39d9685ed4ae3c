"""Loading a configuration, derived from the declarations in :mod:`gitcache.config`: the
TOML file (or the embedded default), the environment's overrides (``GITCACHE_<SECTION>_
<KEY>`` for every key of the fixed sections, typed as a TOML value would be; a misspelt
``GITCACHE_*`` variable is an error), validation errors as messages naming the key; and
back: the effective configuration as TOML that loads again (``gitcache check-config``),
and the README's table of settings (``python -m gitcache.settings``)."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Callable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from gitcache.config import (
    Config,
    ConfigError,
    HookConfig,
    Section,
    UpstreamConfig,
)
from gitcache.config_values import format_duration, format_size, parse_duration, parse_size

ENV_PREFIX = "GITCACHE_"
ENV_CONFIG = "GITCACHE_CONFIG"
# GITCACHE_* variables that are not settings: the config file's path, and the server's
# address for the client (a machine may run both).
NOT_SETTINGS = frozenset({ENV_CONFIG, "GITCACHE_URL"})
_TABLES = ("upstreams", "hooks")  # tables of tables, keyed by a name of the user's


def settings(
    model: type[BaseModel] = Config, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], FieldInfo]]:
    """Every setting of the fixed sections, by its path (``("cache", "disk", "max_size")``)."""
    for name, field in model.model_fields.items():
        kind = field.annotation
        if model is Config and name in _TABLES:
            continue
        if isinstance(kind, type) and issubclass(kind, Section):
            yield from settings(kind, (*path, name))
        elif not field.exclude:
            yield (*path, name), field


def env_name(path: tuple[str, ...]) -> str:
    return ENV_PREFIX + "_".join(path).upper()


ENV_NAMES = {env_name(path): path for path, _ in settings()}
assert len(ENV_NAMES) == len(list(settings())), "two settings share an environment name"


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
    """Validate an already-parsed TOML document (tests build configs this way), with the
    environment's overrides."""
    environ = environ or {}
    data = _with_env(data, environ)
    try:
        return Config.model_validate(data, context={"environ": environ})
    except ValidationError as exc:
        raise ConfigError(_message(exc)) from None


def _with_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """``data`` with every ``GITCACHE_*`` override applied; a variable that names no
    setting (nor a secret the config reads) is refused."""
    # A deep copy: the caller's tables stay as given.
    merged: dict[str, Any] = json.loads(json.dumps(data))
    secrets = _secret_names(merged)
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS or name in secrets:
            continue
        path = ENV_NAMES.get(name)
        if path is None:
            raise ConfigError(f"{name}: no such setting (see `gitcache check-config`)")
        table = merged
        for part in path[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{'.'.join(path[:-1])}: expected a table")
        table[path[-1]] = _typed(raw)
    return merged


def _secret_names(data: dict[str, Any]) -> set[str]:
    names = set()
    for table in _TABLES:
        for entry in (data.get(table) or {}).values():
            if isinstance(entry, dict):
                names |= {str(entry.get("token_env", "")), str(entry.get("secret_env", ""))}
    return names - {""}


def _typed(raw: str) -> object:
    """An environment value as TOML would read it (``true``, ``3``, ``["a/b"]``), or as the
    string it is (``10m``, ``0.0.0.0:8080``)."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _message(exc: ValidationError) -> str:
    """The first error, as ``section.key: what is wrong``."""
    error = exc.errors()[0]
    loc = ".".join(str(part) for part in error["loc"] if part != "[key]")
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):
        return str(cause)  # says which key itself
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{loc}: unknown {'section' if len(error['loc']) == 1 else 'key'}"
    if kind == "literal_error":
        return f"{loc}: must be one of {error['ctx']['expected']}"
    if kind in ("greater_than_equal", "less_than_equal"):
        low, high = _bounds(error["loc"])
        return f"{loc}: must be between {low} and {high}"
    if kind == "missing":
        return f"{loc}: missing"
    return f"{loc}: {str(error['msg']).removeprefix('Value error, ')}"


def _bounds(loc: tuple[int | str, ...]) -> tuple[object, object]:
    fields = dict(settings())
    field = fields.get(tuple(str(p) for p in loc))
    low = high = "?"
    for rule in field.metadata if field is not None else ():
        low = getattr(rule, "ge", low)
        high = getattr(rule, "le", high)
    return low, high


# --- back to TOML --------------------------------------------------------------------------


def dump_config(config: Config) -> str:
    """The effective configuration as TOML, for ``gitcache check-config``; it loads back
    to the same configuration (secrets are read again from where they are named)."""
    lines: list[str] = []
    _emit(lines, (), _human(Config, config.model_dump(mode="json")))
    return "\n".join(lines).strip() + "\n"


def _spelling(field: FieldInfo) -> Callable[[Any], object] | None:
    """How a person writes this field's values, if not as they are stored."""
    for rule in field.metadata:
        func = getattr(rule, "func", None)
        if func is parse_duration:
            return format_duration
        if func is parse_size:
            return format_size
    return None


def _human(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a dump of ``model``) with durations and sizes spelt as a person would."""
    entries: dict[str, type[BaseModel]] = {"upstreams": UpstreamConfig, "hooks": HookConfig}
    out = dict(data)
    for name, value in data.items():
        field = model.model_fields[name]
        kind = field.annotation
        if model is Config and name in entries:
            out[name] = {k: _human(entries[name], v) for k, v in value.items()}
        elif isinstance(kind, type) and issubclass(kind, Section):
            out[name] = _human(kind, value)
        elif (spell := _spelling(field)) is not None:
            out[name] = spell(value)
    return out


def _emit(lines: list[str], header: tuple[str, ...], table: dict[str, Any]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    if header and (scalars or not table):
        lines.append("[" + ".".join(_key(h) for h in header) + "]")
    lines.extend(f"{_key(k)} = {_value(v)}" for k, v in scalars.items())
    if scalars:
        lines.append("")
    for key, value in table.items():
        if isinstance(value, dict):
            _emit(lines, (*header, key), value)


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _value(value: object) -> str:
    """A JSON value as TOML: strings, numbers, booleans and arrays are written alike."""
    return json.dumps(value, ensure_ascii=False)


# --- the README's table --------------------------------------------------------------------


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined:
        return "—"
    default = field.default
    if (spell := _spelling(field)) is not None:
        default = spell(default)
    if isinstance(default, Path):
        default = str(default)
    if isinstance(default, tuple):
        default = list(default)
    return f"`{json.dumps(default, ensure_ascii=False)}`"


def markdown_table() -> str:
    """The README's configuration table, from the declarations."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for path, field in settings():
        rows.append(f"| `{'.'.join(path)}` | {_default(field)} | {field.description or ''} |")
    for prefix, model in (('upstreams."<host>"', UpstreamConfig), ("hooks.<kind>", HookConfig)):
        for name, field in model.model_fields.items():
            if not field.exclude:
                rows.append(f"| `{prefix}.{name}` | {_default(field)} | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
