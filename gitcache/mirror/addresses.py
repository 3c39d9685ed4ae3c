"""No open proxy into the local network, also when DNS says otherwise.

At config load, IP literals and ``localhost`` are refused unless ``allow_private``. A host
name can still resolve to a private address, or resolve to a public one when checked and
to a private one when git connects (DNS rebinding). So, before every git call that reaches
such an upstream, its host is resolved here, every address must be public, and git is
pinned to exactly those addresses with ``http.curloptResolve`` (curl's ``CURLOPT_RESOLVE``):
git connects where the check looked, never where a second lookup might point.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping
from urllib.parse import urlsplit

from gitcache.errors import UpstreamError
from gitcache.mirror.credentials import ConfigEntries, config_env
from gitcache.mirror.runner import git_env

DEFAULT_PORTS = {"http": 80, "https": 443}


def is_public(address: str) -> bool:
    return ipaddress.ip_address(address).is_global


async def lookup(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


async def pinned_resolve(url: str) -> tuple[str, str]:
    """The ``http.curloptResolve`` entry that pins ``url``'s host to its addresses, all of
    them checked public; raises :class:`UpstreamError` otherwise."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host or parts.scheme not in DEFAULT_PORTS:
        raise UpstreamError(f"cannot pin the address of {url!r}")
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    try:
        addresses = await lookup(host, port)
    except OSError as exc:
        raise UpstreamError(f"cannot resolve the upstream host {host}: {exc}") from exc
    private = [a for a in addresses if not is_public(a)]
    if not addresses or private:
        raise UpstreamError(
            f"the upstream host {host} resolves to a non-public address ({', '.join(private)}); "
            "set allow_private = true for it if that is intended"
        )
    listed = ",".join(f"[{a}]" if ":" in a else a for a in addresses)
    return ("http.curloptResolve", f"{host}:{port}:{listed}")


async def upstream_env(
    url: str, entries: ConfigEntries, secrets: Mapping[str, str], *, allow_private: bool
) -> dict[str, str]:
    """The environment of a git child that reaches ``url``: ``entries`` as its config (a
    credential helper, say) and ``secrets`` beside them, pinned to ``url``'s checked
    public addresses unless the upstream allows private ones."""
    if not allow_private:
        entries = (*entries, await pinned_resolve(url))
    return git_env(config_env(entries) | dict(secrets))
