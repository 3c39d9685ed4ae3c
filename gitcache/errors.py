"""The exception tree. Every error a client can see is a :class:`GitcacheError` carrying its
HTTP status and a stable machine-readable ``code``; the web layer turns it into
``{"error": message, "code": code}``. Foreign exceptions are mapped into this tree at the
boundary where they happen (``raise … from exc``), never in the handlers.

    GitcacheError (500)
    ├── BadRequest (400)          malformed repository path, ref or payload
    ├── Unauthorized (401)        no valid token, signature or upstream credential
    ├── Forbidden (403)           an admin route without the right to use it
    ├── NotFound (404)            host not configured, repository or ref unknown upstream
    ├── PreconditionFailed (412)
    ├── RangeNotSatisfiable (416)
    ├── Overloaded (503)          too many generations, or readers of one
    ├── UpstreamError (502)       the upstream failed
    │   └── UpstreamTimeout (504) the upstream did not answer in time
    ├── StorageFull (507)         the local disk is full: a fault of ours, not the upstream's
    ├── GitError (500)            a local git command failed
    └── GenerationFailed (500)    building a snapshot failed
"""

from __future__ import annotations


class GitcacheError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def body(self) -> dict[str, str]:
        return {"error": self.message, "code": self.code}


class BadRequest(GitcacheError):
    status = 400
    code = "bad_request"


class Unauthorized(GitcacheError):
    """401; ``challenge`` goes into ``WWW-Authenticate``."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str, *, challenge: str = 'Bearer realm="gitcache"') -> None:
        super().__init__(message)
        self.challenge = challenge


class Forbidden(GitcacheError):
    status = 403
    code = "forbidden"


class NotFound(GitcacheError):
    status = 404
    code = "not_found"


class PreconditionFailed(GitcacheError):
    status = 412
    code = "precondition_failed"


class PayloadTooLarge(GitcacheError):
    status = 413
    code = "payload_too_large"


class RangeNotSatisfiable(GitcacheError):
    status = 416
    code = "range_not_satisfiable"

    def __init__(self, size: int) -> None:
        super().__init__("the requested range is not satisfiable")
        self.size = size


class Overloaded(GitcacheError):
    """Past a load-shedding limit: a fast 503 with ``Retry-After`` beats a slow collapse."""

    status = 503
    code = "overloaded"
    retry_after = 5


class EntryGone(GitcacheError):
    """A cached snapshot's file vanished between the lookup and the first read (another
    replica pruned it, a bucket lifecycle rule expired it). Raised before anything was
    sent, so the request is served again; a client sees it only if that happens twice."""

    status = 503
    code = "snapshot_gone"
    retry_after = 1


class UpstreamError(GitcacheError):
    status = 502
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class StorageFull(GitcacheError):
    """No space left on the local disk (or over quota) while cloning, fetching or writing."""

    status = 507
    code = "insufficient_storage"


class GitError(GitcacheError):
    """A git command failed; ``stderr`` has its (credential-masked) complaint."""

    code = "git_error"

    def __init__(self, message: str, *, stderr: str = "", returncode: int | None = None) -> None:
        super().__init__(message)
        self.stderr = stderr
        self.returncode = returncode


class GitTimeout(GitError):
    code = "git_timeout"


class GenerationFailed(GitcacheError):
    code = "generation_failed"
