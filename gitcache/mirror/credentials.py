"""Handing upstream credentials (and other settings) to git without a command line or a
config file.

Git reads configuration from ``GIT_CONFIG_COUNT``/``GIT_CONFIG_KEY_n``/``GIT_CONFIG_VALUE_n``
environment variables. A credential helper scoped to the upstream's URL answers git's
``get`` with a username and password that are themselves environment variables of the git
child: nothing lands in ``/proc/<pid>/cmdline``, in a mirror's ``config``, or in a snapshot.
"""

from __future__ import annotations

from urllib.parse import urlsplit

USERNAME_VAR = "GITCACHE_GIT_USERNAME"
PASSWORD_VAR = "GITCACHE_GIT_PASSWORD"  # noqa: S105 (a variable name, not a password)
# A shell function git runs as its helper: `get` prints the two variables, `store` and
# `erase` do nothing (nothing is ever written to disk).
HELPER = (
    f'!f() {{ test "$1" = get && printf "username=%s\\npassword=%s\\n" '
    f'"${USERNAME_VAR}" "${PASSWORD_VAR}"; }}; f'
)

ConfigEntries = tuple[tuple[str, str], ...]


def config_env(entries: ConfigEntries) -> dict[str, str]:
    """``git -c key=value …`` as environment variables."""
    env = {"GIT_CONFIG_COUNT": str(len(entries))}
    for i, (key, value) in enumerate(entries):
        env[f"GIT_CONFIG_KEY_{i}"] = key
        env[f"GIT_CONFIG_VALUE_{i}"] = value
    return env


def credential_config(url: str) -> ConfigEntries:
    """The helper for ``url``'s origin, alone: no helper from system or user config sees
    these requests (the empty helper first resets the list)."""
    parts = urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"
    return (("credential.helper", ""), (f"credential.{origin}.helper", HELPER))


def credential_secrets(username: str, password: str) -> dict[str, str]:
    """What the helper prints, as the git child's environment."""
    return {USERNAME_VAR: username, PASSWORD_VAR: password}
