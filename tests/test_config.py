"""Configuration: sizes, durations, env overrides, and errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gitcache.config import ConfigError
from gitcache.config_values import parse_duration, parse_size
from gitcache.settings import (
    ENV_NAMES,
    config_from_dict,
    dump_config,
    load_config,
    markdown_table,
    settings,
)

UPSTREAMS = {"upstreams": {"github.com": {"url": "https://github.com/{repo}.git"}}}


def test_sizes_and_durations() -> None:
    assert parse_size("50GiB") == 50 * 1024**3
    assert parse_size("10GB") == 10 * 1000**3
    assert parse_size("1.5 MiB") == 1572864
    assert parse_size(1024) == 1024
    assert parse_duration("10m") == 600
    assert parse_duration("250ms") == 0.25
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration(90) == 90
    for bad in ("ten", "5 parsecs", -1, True, "1e3"):
        with pytest.raises(ValueError):
            parse_size(bad)
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_the_embedded_default_is_valid() -> None:
    config = load_config(environ={})
    assert set(config.upstreams) == {"github.com", "gitlab.com", "bitbucket.org"}
    assert config.cache.backend == "disk"
    assert config.upstreams["github.com"].url_for("a/b") == "https://github.com/a/b.git"


def test_example_config_is_the_embedded_default() -> None:
    example = Path(__file__).parent.parent / "config" / "gitcache.toml"
    assert load_config(example, environ={}) == load_config(environ={})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"server": {"listen": "nowhere"}}, "server.listen: 'nowhere' is not HOST:PORT"),
        ({"server": {"shutdown_timeout": "soon"}}, "server.shutdown_timeout: 'soon'"),
        ({"server": {"colour": "blue"}}, "server.colour: unknown key"),
        ({"cache": {"disk": {"max_size": "lots"}}}, "cache.disk.max_size: 'lots'"),
        ({"cache": {"backend": "tape"}}, "cache.backend: must be one of"),
        ({"snapshot": {"zstd_level": 99}}, "snapshot.zstd_level: must be between"),
        ({"extra": {}}, "extra: unknown section"),
        ({"upstreams": {"github.com": {"url": "https://github.com/x.git"}}}, "must contain"),
        ({"upstreams": {"github.com": {"url": "ftp://x/{repo}"}}}, "must start with"),
        ({"upstreams": {"Bad Host": {"url": "https://x/{repo}"}}}, "upstreams.Bad Host"),
        ({"upstreams": {}}, "at least one upstream"),
    ],
)
def test_errors_name_the_key(data: dict[str, object], message: str) -> None:
    merged = {**UPSTREAMS, **data}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", "'")):
        config_from_dict(merged)


def test_environment_overrides() -> None:
    config = config_from_dict(
        UPSTREAMS,
        {
            "GITCACHE_SERVER_LISTEN": "0.0.0.0:9000",
            "GITCACHE_CACHE_DISK_MAX_SIZE": "1GiB",
            "GITCACHE_SNAPSHOT_ZSTD_LEVEL": "7",
        },
    )
    assert (config.server.host, config.server.port) == ("0.0.0.0", 9000)
    assert config.cache.disk.max_size == 1024**3
    assert config.snapshot.zstd_level == 7


def test_check_config_cli(tmp_path: Path) -> None:
    good = subprocess.run(
        [sys.executable, "-m", "gitcache.cli", "check-config"], capture_output=True, text=True
    )
    assert good.returncode == 0
    assert '[upstreams."github.com"]' in good.stdout
    bad_file = tmp_path / "bad.toml"
    bad_file.write_text('[server]\nlisten = "x"\n[upstreams."a.b"]\nurl = "https://a.b/{repo}"\n')
    bad = subprocess.run(
        [sys.executable, "-m", "gitcache.cli", "check-config", "--config", str(bad_file)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "server.listen" in bad.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "gitcache.cli", "check-config", "--config", "/nonexistent.toml"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "cannot read config file" in missing.stderr


def test_s3_settings() -> None:
    with pytest.raises(ConfigError, match=r"cache\.s3\.bucket: required"):
        config_from_dict({**UPSTREAMS, "cache": {"backend": "s3"}})
    with pytest.raises(ConfigError, match=r"cache\.s3\.part_size: must be at least 5MiB"):
        config_from_dict({**UPSTREAMS, "cache": {"s3": {"part_size": "1MiB"}}})
    config = config_from_dict(
        {**UPSTREAMS, "cache": {"backend": "s3", "s3": {"bucket": "b", "part_size": "8MiB"}}}
    )
    assert config.cache.s3.part_size == 8 * 1024**2


def test_readme_table_is_the_declarations() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("| key | default | meaning |")
    end = readme.index("<!-- end of the table -->")
    assert readme[start:end].strip() == markdown_table()


def test_every_key_has_an_environment_name_and_help() -> None:
    for path, field in settings():
        assert field.description, ".".join(path)
    assert ENV_NAMES["GITCACHE_CACHE_DISK_MAX_SIZE"] == ("cache", "disk", "max_size")
    assert ENV_NAMES["GITCACHE_CACHE_S3_REDIRECT"] == ("cache", "s3", "redirect")


def test_environment_overrides_are_typed() -> None:
    config = config_from_dict(
        {**UPSTREAMS, "cache": {"s3": {"bucket": "b"}}},
        {
            "GITCACHE_CACHE_S3_REDIRECT": "true",
            "GITCACHE_REFRESH_PINNED": '["github.com/org/repo"]',
            "GITCACHE_MIRRORS_FETCH_INTERVAL": "90s",
            "GITCACHE_SERVER_STATE_DIR": "/srv/gitcache",
            "GITCACHE_LOG_LEVEL": "debug",
            "GITCACHE_URL": "http://gitcache:8080",  # the client's: not a setting
        },
    )
    assert config.cache.s3.redirect is True
    assert config.refresh.pinned == ("github.com/org/repo",)
    assert config.mirrors.fetch_interval == 90
    assert config.server.state_dir == Path("/srv/gitcache")
    assert config.log.level == "DEBUG"
    with pytest.raises(ConfigError, match=r"cache\.s3\.redirect: "):
        config_from_dict(UPSTREAMS, {"GITCACHE_CACHE_S3_REDIRECT": "maybe"})


def test_a_misspelt_environment_variable_is_an_error() -> None:
    with pytest.raises(ConfigError, match="GITCACHE_SERVER_LISTNE: no such setting"):
        config_from_dict(UPSTREAMS, {"GITCACHE_SERVER_LISTNE": "0.0.0.0:1"})
    # A secret the config itself names may carry the prefix.
    named = {"upstreams": {"github.com": {"url": "https://github.com/{repo}.git"}}}
    named["upstreams"]["github.com"]["token_env"] = "GITCACHE_GITHUB_TOKEN"
    config = config_from_dict(named, {"GITCACHE_GITHUB_TOKEN": "t0ken"})
    assert config.upstreams["github.com"].token == "t0ken"


def test_check_config_output_loads_back(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("hook-secret\n")
    data = {
        **UPSTREAMS,
        "server": {"drain_delay": "250ms"},
        "cache": {"backend": "tiered", "s3": {"bucket": "b"}},  # endpoint_url stays empty
        "refresh": {"pinned": ["github.com/org/repo"]},
        "hooks": {"github": {"secret_file": str(secret)}},
    }
    config = config_from_dict(data)
    dumped = dump_config(config)
    assert "hook-secret" not in dumped
    path = tmp_path / "dumped.toml"
    path.write_text(dumped)
    assert load_config(path, environ={}) == config
