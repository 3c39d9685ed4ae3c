"""The small files of a snapshot's ``.git``, as ``git clone`` would have written them:
``HEAD``, ``config``, ``packed-refs`` and ``refs/remotes/origin/HEAD``. Written with
dulwich, in memory; the big ones (packs, loose objects, index) come from disk."""

from __future__ import annotations

import io
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from dulwich.config import ConfigFile
from dulwich.refs import write_packed_refs

from gitcache.mirror.refs import Checkout, RefState
from gitcache.variant import FULL, Kind, Variant

INFO_EXCLUDE = b"""# git ls-files --others --exclude-from=.git/info/exclude
# Lines that start with '#' are comments.
# For a project mostly in C, the following would be a good set of
# exclude patterns (uncomment them if you want to use them):
# *.[oa]
# *~
"""


def public_url(url: str) -> str:
    """The upstream URL with any user and password removed: what ``origin`` points at."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def object_format(mirror: Path) -> str:
    config = ConfigFile.from_path(str(mirror / "config"))
    try:
        return config.get((b"extensions",), b"objectformat").decode().lower()
    except KeyError:
        return "sha1"


def head_file(checkout: Checkout) -> bytes:
    if checkout.branch is None:
        return f"{checkout.commit}\n".encode()
    return f"ref: refs/heads/{checkout.branch}\n".encode()


def config_file(
    url: str, checkout: Checkout, objformat: str = "sha1", variant: Variant = FULL
) -> bytes:
    """``.git/config`` as ``git clone`` writes it, with the options of the variant:
    ``--depth`` fetches one branch, ``--filter`` makes origin a promisor remote."""
    partial = variant.kind is Kind.BLOBLESS
    config = ConfigFile()
    version = b"1" if objformat != "sha1" or partial else b"0"
    config.set((b"core",), b"repositoryformatversion", version)
    config.set((b"core",), b"filemode", True)
    config.set((b"core",), b"bare", False)
    config.set((b"core",), b"logallrefupdates", True)
    if objformat != "sha1":
        config.set((b"extensions",), b"objectformat", objformat.encode())
    origin = (b"remote", b"origin")
    config.set(origin, b"url", public_url(url).encode())
    branches = b"*"
    if variant.kind is Kind.SHALLOW and checkout.branch is not None:
        branches = checkout.branch.encode()
    config.set(origin, b"fetch", b"+refs/heads/%s:refs/remotes/origin/%s" % (branches, branches))
    if partial:
        config.set(origin, b"promisor", True)
        config.set(origin, b"partialclonefilter", variant.query.removeprefix("filter=").encode())
    if checkout.branch is not None:
        branch = (b"branch", checkout.branch.encode())
        config.set(branch, b"remote", b"origin")
        config.set(branch, b"merge", f"refs/heads/{checkout.branch}".encode())
    out = io.BytesIO()
    config.write_to_file(out)
    return out.getvalue()


def packed_refs_file(refs: RefState, checkout: Checkout) -> bytes:
    """Branches as ``refs/remotes/origin/*``, the checked-out branch as a local branch,
    tags as tags with their peeled commits: the refs of a fresh clone."""
    packed: dict[bytes, bytes] = {}
    peeled: dict[bytes, bytes] = {}
    for name, sha in refs.refs.items():
        if name.startswith("refs/heads/"):
            packed[b"refs/remotes/origin/" + name[len("refs/heads/") :].encode()] = sha.encode()
        else:
            packed[name.encode()] = sha.encode()
            if name in refs.peeled:
                peeled[name.encode()] = refs.peeled[name].encode()
    if checkout.branch is not None:
        packed[f"refs/heads/{checkout.branch}".encode()] = checkout.commit.encode()
    out = io.BytesIO()
    write_packed_refs(out, dict(sorted(packed.items())), peeled)  # type: ignore[arg-type]
    return out.getvalue()


def origin_head_file(refs: RefState) -> bytes | None:
    if refs.head is None or refs.head not in refs.refs:
        return None
    return f"ref: refs/remotes/origin/{refs.head.removeprefix('refs/heads/')}\n".encode()
