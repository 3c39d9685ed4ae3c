"""Handing upstream credentials to git without a command line or a config file.

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


def credential_env(url: str, username: str, password: str) -> dict[str, str]:
    """Environment for a git child that must authenticate to ``url``'s host."""
    parts = urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"
    return {
        "GIT_CONFIG_COUNT": "2",
        # An empty helper first: no helper from system or user config sees these requests.
        "GIT_CONFIG_KEY_0": "credential.helper",
        "GIT_CONFIG_VALUE_0": "",
        "GIT_CONFIG_KEY_1": f"credential.{origin}.helper",
        "GIT_CONFIG_VALUE_1": HELPER,
        USERNAME_VAR: username,
        PASSWORD_VAR: password,
    }
