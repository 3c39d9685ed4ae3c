"""Inbound bearer tokens (``[auth] tokens_file``) and pass-through authorization against
the upstream (``upstreams.<host>.auth = "passthrough"``).

The tokens file holds only sha256 hashes of tokens, each with the repositories it may read
and whether it may use the admin routes::

    [[tokens]]
    name = "ci"                        # for logs; the token itself is never logged
    sha256 = "<hex sha256 of the token>"
    repos = ["github.com/org/*"]       # fnmatch patterns over "host/path"
    admin = false
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import hmac
import logging
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gitcache.config import Config, ConfigError, UpstreamConfig
from gitcache.errors import GitError, NotFound, Unauthorized, UpstreamError
from gitcache.mirror.addresses import upstream_env
from gitcache.mirror.credentials import credential_config, credential_secrets
from gitcache.mirror.runner import run_git
from gitcache.mirror.store import upstream_failure
from gitcache.repo import RepoRef

log = logging.getLogger(__name__)

# Basic too: git asks its credential helper only when offered a scheme it knows.
BEARER_CHALLENGE = 'Bearer realm="gitcache", Basic realm="gitcache"'
BASIC_CHALLENGE = 'Basic realm="gitcache"'


@dataclass(frozen=True)
class Token:
    name: str
    sha256: str
    repos: tuple[str, ...]
    admin: bool

    def may_read(self, repo: RepoRef) -> bool:
        return any(fnmatch.fnmatchcase(repo.name, pattern) for pattern in self.repos)


class Tokens:
    def __init__(self, tokens: list[Token]) -> None:
        self._tokens = tokens

    @classmethod
    def load(cls, path: Path) -> Tokens:
        try:
            data = tomllib.loads(path.read_text("utf-8"))
            tokens = [
                Token(
                    name=str(t.get("name", f"token {i}")),
                    sha256=str(t["sha256"]).lower(),
                    repos=tuple(str(p) for p in t.get("repos", [])),
                    admin=bool(t.get("admin", False)),
                )
                for i, t in enumerate(data.get("tokens", []))
            ]
        except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"auth.tokens_file: {path}: {exc}") from None
        for token in tokens:
            if len(token.sha256) != 64 or not all(c in "0123456789abcdef" for c in token.sha256):
                raise ConfigError(f"auth.tokens_file: {token.name}: sha256 is not 64 hex digits")
        return cls(tokens)

    def identify(self, authorization: str) -> Token:
        """The token an ``Authorization: Bearer …`` header presents, or the password of a
        Basic one (what git's credential helpers send); 401 otherwise. Every known hash is
        compared, in constant time, whatever matches."""
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() == "basic":
            try:
                presented = base64.b64decode(presented.strip()).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                presented = ""
        elif scheme.lower() != "bearer":
            presented = ""
        if not presented.strip():
            raise Unauthorized("a bearer token is required", challenge=BEARER_CHALLENGE)
        digest = hashlib.sha256(presented.strip().encode()).hexdigest().encode()
        found = None
        for token in self._tokens:
            if hmac.compare_digest(digest, token.sha256.encode()):
                found = token
        if found is None:
            raise Unauthorized("invalid token", challenge=BEARER_CHALLENGE)
        return found


def upstream_credentials(upstream: UpstreamConfig, authorization: str) -> tuple[str, str]:
    """(username, password) from a client's ``Authorization`` header: Basic as given, a
    Bearer token as the password of the upstream's configured username."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "basic":
        try:
            username, sep, password = base64.b64decode(value.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            username, sep, password = "", "", ""
        if sep and username and password:
            return username, password
    elif scheme.lower() == "bearer" and value.strip():
        return upstream.username, value.strip()
    raise Unauthorized(
        "upstream credentials are required (Basic or Bearer)", challenge=BASIC_CHALLENGE
    )


class Passthrough:
    """Checks a client's own credentials against the upstream before anything cached is
    served. Allowed decisions are remembered for ``auth_ttl``, keyed by a hash of the
    credential and the repository; refusals are never remembered, so a revoked credential
    is refused at most ``auth_ttl`` after its last successful check."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._clock = clock
        self._allowed: dict[str, float] = {}

    async def check(self, repo: RepoRef, authorization: str | None) -> None:
        upstream = self._config.upstreams[repo.host]
        if not authorization:
            raise Unauthorized("upstream credentials are required", challenge=BASIC_CHALLENGE)
        username, password = upstream_credentials(upstream, authorization)
        key = hashlib.sha256(f"{repo.name}\0{username}\0{password}".encode()).hexdigest()
        now = self._clock()
        if self._allowed.get(key, 0.0) > now:
            return
        url = upstream.url_for(repo.path)
        try:
            await run_git(
                ["ls-remote", "--", url, "HEAD"],
                timeout=self._config.mirrors.git_timeout,
                env=await upstream_env(
                    url,
                    credential_config(url),
                    credential_secrets(username, password),
                    allow_private=upstream.allow_private,
                ),
            )
        except GitError as exc:
            failure = upstream_failure(repo, exc)
            if isinstance(failure, UpstreamError):
                raise failure from exc
            # Refused upstream: the same answer as for a repository that does not exist.
            raise NotFound(f"repository {repo.name} not found", code="repo_not_found") from None
        self._allowed = {k: t for k, t in self._allowed.items() if t > now}
        self._allowed[key] = now + upstream.auth_ttl
