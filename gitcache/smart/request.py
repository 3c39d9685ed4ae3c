"""An upload-pack request as gitcache reads it: enough to know what it wants, whether its
answer can be shared, and under which key. git itself parses it again; a request this
module cannot read is refused before git sees it.

Two requests get the same answer from the same mirror when they say the same things in
any order (wants, haves, shallow lines, depth and filter arguments, capabilities), apart
from the client's ``agent`` and ``session-id``. Only a request that ends the negotiation
(``done``) is shared: it is answered with a pack. Negotiation rounds, ``ls-refs`` and
``object-info`` are answered from the mirror every time.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass

from dulwich.errors import GitProtocolError, HangupException
from dulwich.protocol import Protocol

from gitcache.errors import BadRequest

_OID = re.compile(rb"[0-9a-f]{40}(?:[0-9a-f]{24})?")
_PERSONAL = (b"agent=", b"session-id=")  # who asks, not what is asked
_VERSION = re.compile(r"(?:^|:)version=([0-9])(?::|$)")


def protocol_version(header: str | None) -> int:
    """The protocol version a ``Git-Protocol`` header asks for (0 when none)."""
    match = _VERSION.search(header or "")
    return int(match[1]) if match else 0


@dataclass(frozen=True)
class UploadRequest:
    version: int
    lines: tuple[bytes, ...]  # the pkt-lines' contents, in order, without newlines

    @property
    def wants(self) -> list[str]:
        """The object ids asked for by id (``want-ref`` names are resolved by git)."""
        out = []
        for line in self.lines:
            if line.startswith(b"want ") and (match := _OID.match(line, 5)):
                out.append(match[0].decode())
        return out

    @property
    def command(self) -> str:
        """``fetch``, ``ls-refs``, … for protocol v2; ``fetch`` for v0 and v1."""
        for line in self.lines:
            if line.startswith(b"command="):
                return line[len(b"command=") :].decode("ascii", "replace")
        return "fetch" if self.version < 2 else ""

    @property
    def shareable(self) -> bool:
        """Whether the answer is a pack that any identical request may be given."""
        return self.command == "fetch" and b"done" in self.lines and bool(self.wants)

    def key(self, refs_digest: str) -> str:
        """The cache key of the answer, for a mirror whose refs have ``refs_digest``."""
        h = hashlib.sha256(f"upload-pack v{self.version}\n{refs_digest}\n".encode())
        for line in sorted(self._normalised()):
            h.update(line + b"\n")
        return f"pack-{h.hexdigest()[:32]}"

    def _normalised(self) -> list[bytes]:
        out = []
        for line in self.lines:
            if line.startswith(_PERSONAL):
                continue
            if self.version < 2 and line.startswith(b"want ") and b" " in line[5:]:
                # v0 and v1 carry the capabilities on the first want line.
                want, _, caps = line.partition(b" ")[2].partition(b" ")
                out.append(b"want " + want)
                out.extend(b"cap " + c for c in caps.split() if not c.startswith(_PERSONAL))
                continue
            out.append(line)
        return out


def parse_request(body: bytes, version: int) -> UploadRequest:
    """Read ``body`` as pkt-lines; 400 if it is not."""
    proto = Protocol(io.BytesIO(body).read, None)  # type: ignore[arg-type]
    lines = []
    try:
        while True:
            try:
                pkt = proto.read_pkt_line()
            except HangupException:
                break  # the end of the body
            if pkt is not None:
                lines.append(pkt.rstrip(b"\n"))
    except GitProtocolError as exc:
        raise BadRequest(f"not a git request: {exc}", code="invalid_git_request") from None
    return UploadRequest(version, tuple(lines))
