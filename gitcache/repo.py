"""What a request names: a repository on a configured upstream host, and optionally a ref.

Everything a client sends is validated here, before any file is touched or any git command
runs. A valid :class:`RepoRef` is safe to use as a relative filesystem path (no ``..``, no
empty or dot segments) and as a git argument (no leading ``-``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from gitcache.config import UpstreamConfig
from gitcache.errors import BadRequest, NotFound
from gitcache.variant import FULL, Variant, from_query

MAX_REPO_LENGTH = 256
MAX_REPO_SEGMENTS = 16
MAX_REF_LENGTH = 255

# Letters, digits, "_", "-" and "."; GitHub's ".github" repositories start with a dot, but
# no segment may start with "-" (it would read as an option) or be "." or "..".
_SEGMENT = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*")
_FULL_SHA = re.compile(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{64}")
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


@dataclass(frozen=True)
class RepoRef:
    """A validated repository: ``host`` is a configured upstream, ``path`` its repository
    path without a ``.git`` suffix (``group/subgroup/name``)."""

    host: str
    path: str

    @property
    def name(self) -> str:
        return f"{self.host}/{self.path}"

    @property
    def slug(self) -> str:
        """One path segment naming the repository (``group%2Fname``). Flat, so that
        repository ``a/b`` and ``a/b/c`` never nest inside each other's files; ``%`` is
        not allowed in a path, so two repositories never share a slug."""
        return self.path.replace("/", "%2F")

    @classmethod
    def from_slug(cls, host: str, slug: str) -> RepoRef:
        return cls(host, slug.replace("%2F", "/"))

    @property
    def basename(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def parse_repo(host: str, path: str, upstreams: Mapping[str, UpstreamConfig]) -> RepoRef:
    """Validate ``host`` and ``path`` from a request; raise 400 or 404 otherwise."""
    if len(path) > MAX_REPO_LENGTH:
        raise BadRequest(
            f"repository path longer than {MAX_REPO_LENGTH} characters", code="invalid_repo"
        )
    if path.endswith(".git"):
        path = path[: -len(".git")]
    segments = path.split("/")
    if len(segments) > MAX_REPO_SEGMENTS:
        raise BadRequest(
            f"repository path has more than {MAX_REPO_SEGMENTS} segments", code="invalid_repo"
        )
    for segment in segments:
        if not segment:
            raise BadRequest("repository path has an empty segment", code="invalid_repo")
        if segment in {".", ".."} or not _SEGMENT.fullmatch(segment):
            raise BadRequest(
                f"repository path segment {segment!r} is not allowed: use letters, digits, "
                "'_', '-' and '.', not starting with '-'",
                code="invalid_repo",
            )
    if host not in upstreams:
        raise NotFound(f"host {host!r} is not a configured upstream", code="unknown_host")
    return RepoRef(host=host, path=path)


@dataclass(frozen=True)
class RefSpec:
    """What to check out: the upstream's default branch (``name`` is None), a branch or tag
    name (``refs/heads/x`` and ``refs/tags/x`` may be spelled out), or a full commit id;
    and the variant of snapshot made of it."""

    name: str | None = None
    sha: str | None = None
    variant: Variant = FULL

    @property
    def label(self) -> str:
        """A stable string for cache lookups: ``HEAD``, the ref name, or the sha, then the
        variant as a query (``main?depth=1``; "?" is never part of a ref name)."""
        ref = self.sha or self.name or "HEAD"
        return f"{ref}?{self.variant.query}" if self.variant.query else ref

    def candidates(self) -> tuple[str, ...]:
        """Full ref names to try, in ``git clone --branch`` order: branch before tag."""
        if self.name is None:
            return ()
        if self.name.startswith(("refs/heads/", "refs/tags/")):
            return (self.name,)
        return (f"refs/heads/{self.name}", f"refs/tags/{self.name}")


def parse_ref(ref: str | None, variant: Variant = FULL) -> RefSpec:
    """Validate the ``ref`` query parameter with git's ``check-ref-format`` rules."""
    if ref is None or ref == "HEAD":  # HEAD is the default branch, however it is asked for
        return RefSpec(variant=variant)
    if _FULL_SHA.fullmatch(ref):
        return RefSpec(sha=ref.lower(), variant=variant)
    problem = _ref_problem(ref)
    if problem:
        raise BadRequest(f"ref {ref[:80]!r} is not valid: {problem}", code="invalid_ref")
    return RefSpec(name=ref, variant=variant)


def parse_label(label: str) -> RefSpec:
    """The spec a :attr:`RefSpec.label` stands for, validated as a request's would be."""
    ref, _, query = label.partition("?")
    return parse_ref(ref, from_query(query))


def _ref_problem(ref: str) -> str | None:
    if not ref:
        return "it is empty"
    if len(ref) > MAX_REF_LENGTH:
        return f"longer than {MAX_REF_LENGTH} characters"
    if _REF_FORBIDDEN.search(ref):
        return "control characters, spaces and ~^:?*[\\ are not allowed"
    if ref.startswith(("-", "/")) or ref.endswith(("/", ".")):
        return "it may not start with '-' or '/' nor end with '/' or '.'"
    if ".." in ref or "@{" in ref or "//" in ref or ref == "@":
        return "'..', '@{', '//' and '@' are not allowed"
    for component in ref.split("/"):
        if component.startswith(".") or component.endswith(".lock"):
            return "no component may start with '.' or end with '.lock'"
    return None
