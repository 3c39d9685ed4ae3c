"""Tar framing: the headers gitcache writes itself, and splicing ``git archive``'s output.

Headers are POSIX pax (long and non-ASCII names survive). The snapshot's tar is our own
``.git`` entries followed by ``git archive``'s stream with its leading global header (a
comment holding the commit id) removed; its end-of-archive blocks end the whole tar, so
the working tree is passed through without parsing a single member.
"""

from __future__ import annotations

import tarfile

BLOCK = 512


def header(
    name: str,
    *,
    size: int = 0,
    mode: int = 0o644,
    kind: bytes = tarfile.REGTYPE,
    mtime: int = 0,
    linkname: str = "",
) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size if kind == tarfile.REGTYPE else 0
    info.mode = mode
    info.type = kind
    info.mtime = mtime
    info.linkname = linkname
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


def padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def file_entry(name: str, data: bytes, *, mode: int = 0o644, mtime: int = 0) -> bytes:
    return header(name, size=len(data), mode=mode, mtime=mtime) + data + padding(len(data))


def dir_entry(name: str, *, mtime: int = 0) -> bytes:
    return header(name.rstrip("/") + "/", mode=0o755, kind=tarfile.DIRTYPE, mtime=mtime)


def _octal(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.rstrip(b"\0 ").strip()
    return int(text, 8) if text else 0


def global_header_length(first: bytes) -> int:
    """Given a tar's first block: the length of its pax global header (header and data,
    padded), or 0 if it does not start with one."""
    if first[156:157] != tarfile.XGLTYPE:
        return 0
    size = _octal(first[124:136])
    return BLOCK + size + (-size % BLOCK)
