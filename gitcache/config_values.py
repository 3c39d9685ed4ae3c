"""Parsers of single configuration values: sizes, durations, choices, secrets read from
the environment or a file, and the check that keeps gitcache from being an open proxy into
the local network. Each raises ValueError (or ConfigError) with a message that reads well
after the key's name."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and what is wrong."""


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_duration(value: object) -> float:
    """Seconds from ``90``, ``"1.5s"``, ``"10m"``, ``"2h"``, ``"7d"`` or ``"250ms"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '30s' or '10m'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", value)
        if not match:
            raise ValueError(f"{value!r} is not a duration such as '30s' or '10m'")
        seconds = float(match[1]) * _DURATION_UNITS[match[2] or "s"]
    else:
        raise ValueError("expected a duration such as '30s' or '10m'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest spelling :func:`parse_duration` reads back: ``"30s"``, ``"7d"``."""
    if seconds == 0:
        return "0s"
    for unit in ("d", "h", "m", "s"):
        scale = _DURATION_UNITS[unit]
        if seconds >= scale and float(seconds / scale).is_integer():
            return f"{int(seconds / scale)}{unit}"
    millis = seconds * 1000
    return f"{int(millis)}ms" if float(millis).is_integer() else f"{seconds}s"


def format_size(size: int) -> str | int:
    """The shortest spelling :func:`parse_size` reads back: ``"50GiB"``, or the bytes."""
    for unit in ("tib", "gib", "mib", "kib"):
        scale = _SIZE_UNITS[unit]
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit[0].upper()}iB"
    return size


def parse_size(value: object) -> int:
    """Bytes from ``1048576``, ``"512MiB"``, ``"50GiB"`` or ``"10GB"``."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as '512MiB' or '50GiB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if not match or match[2].lower() not in _SIZE_UNITS:
            raise ValueError(f"{value!r} is not a size such as '512MiB' or '50GiB'")
        size = int(float(match[1]) * _SIZE_UNITS[match[2].lower()])
    else:
        raise ValueError("expected a size such as '512MiB' or '50GiB'")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


def parse_str(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def parse_listen(value: object) -> str:
    text = parse_str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return text


def parse_repo_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, str) and "/" in v for v in value
    ):
        raise ValueError('expected a list of "host/repository" strings')
    return tuple(v.removesuffix(".git") for v in value)


def parse_upstream_url(value: object) -> str:
    url = parse_str(value)
    if "{repo}" not in url:
        raise ValueError("must contain '{repo}', e.g. 'https://github.com/{repo}.git'")
    if not re.match(r"(https?|file)://", url):
        raise ValueError("must start with https://, http:// or file://")
    return url


def read_secret(
    name: str, kind: str, env: str, file: str, environ: Mapping[str, str] | None
) -> str:
    """A secret from the environment variable ``env`` or the file ``file`` (exactly one)."""
    if bool(env) == bool(file):
        raise ConfigError(f"{name}: set exactly one of {kind}_env and {kind}_file")
    if env:
        secret = (os.environ if environ is None else environ).get(env, "")
        if not secret:
            raise ConfigError(f"{name}.{kind}_env: ${env} is not set")
        return secret
    try:
        secret = Path(file).read_text("utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{name}.{kind}_file: cannot read: {exc.strerror or exc}") from None
    if not secret:
        raise ConfigError(f"{name}.{kind}_file: the file is empty")
    return secret


def require_public(name: str, host: str, url: str) -> None:
    """No open proxy into the local network: IP literals, localhost and file:// URLs need
    ``allow_private = true``."""
    parts = urlsplit(url.replace("{repo}", "x"))
    if parts.scheme == "file":
        raise ConfigError(f"{name}.url: file:// URLs need allow_private = true")
    for candidate in (host.rsplit(":", 1)[0] if host.count(":") == 1 else host, parts.hostname):
        if not candidate:
            continue
        try:
            ipaddress.ip_address(candidate.strip("[]"))
        except ValueError:
            if candidate == "localhost" or candidate.endswith(".localhost"):
                raise ConfigError(
                    f"{name}: {candidate!r} is local; set allow_private = true to allow it"
                ) from None
            continue
        raise ConfigError(
            f"{name}: {candidate!r} is an IP literal; set allow_private = true to allow it"
        )
