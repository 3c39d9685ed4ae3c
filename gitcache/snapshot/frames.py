"""zstd frames that store bytes as they are, for the parts of a snapshot that do not
compress (pack files: git has already deflated every object in them).

zstd at level 3 saves about 1% of a pack and is the slowest step of a miss; even its
fastest levels run at a fraction of the speed of copying. A frame of raw blocks costs a
copy and an xxh64: it is a valid zstd frame (RFC 8878, section 3.1.1) that every decoder
reads, ``zstd -d`` included, and a snapshot is a sequence of frames, compressed where that
pays and stored where it does not, which decodes as one stream.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

import xxhash

MAGIC = b"\x28\xb5\x2f\xfd"
# A skippable frame (section 3.1.2: every decoder passes over it) before each stored frame,
# so that a client that has verified the whole download some other way (its sha256) can
# take the stored bytes straight from it instead of through ``zstd -d``; the client keeps
# its own copy of these bytes (it imports nothing from the server).
MARK = b"\x5e\x2a\x4d\x18" + (15).to_bytes(4, "little") + b"gitcache:stored"
BLOCK_MAX = 128 * 1024  # the largest block a frame may hold
# Frame header descriptor 0x04: no content size (frames are written as data arrives), not
# single-segment, a content checksum, no dictionary. Window descriptor 0x38: 2^17 bytes,
# one block, the least a decoder may be asked for (raw blocks reference nothing).
HEADER = MAGIC + b"\x04\x38"
_RAW, _LAST = 0, 1


class Framing(Enum):
    """How a spool writes a chunk: through zstd, in a stored frame, or as it is (a spool
    that is not zstd at all: an upload-pack response)."""

    COMPRESSED = "compressed"
    STORED = "stored"
    VERBATIM = "verbatim"


class Stored(NamedTuple):
    """Bytes of a snapshot's tar that go into a stored frame rather than through zstd."""

    data: bytes


class Verbatim(NamedTuple):
    """Bytes written to a spool as they are, outside any frame."""

    data: bytes


def framing(chunk: bytes | Stored | Verbatim) -> tuple[bytes, Framing]:
    if isinstance(chunk, Stored):
        return chunk.data, Framing.STORED
    if isinstance(chunk, Verbatim):
        return chunk.data, Framing.VERBATIM
    return chunk, Framing.COMPRESSED


def _block_header(size: int, *, last: bool) -> bytes:
    return ((size << 3) | (_RAW << 1) | (_LAST if last else 0)).to_bytes(3, "little")


class StoredFrame:
    """One frame of raw blocks, written as its bytes arrive. The last block of a frame
    carries a flag, so each call holds its final block back until the next call or
    :meth:`finish` tells whether more follows."""

    def __init__(self) -> None:
        self._checksum = xxhash.xxh64()
        self._held: memoryview | None = None
        self._started = False

    def update(self, data: bytes) -> list[bytes | memoryview]:
        """The pieces to write for ``data`` (views of it: no copy)."""
        pieces: list[bytes | memoryview] = []
        if not self._started:
            pieces += [MARK, HEADER]
            self._started = True
        if not data:
            return pieces
        self._checksum.update(data)
        view = memoryview(data)
        if self._held is not None:
            pieces += [_block_header(len(self._held), last=False), self._held]
        blocks = [view[i : i + BLOCK_MAX] for i in range(0, len(view), BLOCK_MAX)]
        for block in blocks[:-1]:
            pieces += [_block_header(len(block), last=False), block]
        self._held = blocks[-1]
        return pieces

    def finish(self) -> list[bytes | memoryview]:
        """The pieces that end the frame: its last block and its checksum."""
        pieces = self.update(b"")
        held = self._held if self._held is not None else memoryview(b"")
        pieces += [_block_header(len(held), last=True), held]
        pieces.append((self._checksum.intdigest() & 0xFFFFFFFF).to_bytes(4, "little"))
        self._held = None
        return pieces


# A stored frame of one block, from its mark to its block header: what
# :func:`single_stored_length` reads.
SINGLE_PREFIX = len(MARK) + len(HEADER) + 3


def single_stored_length(prefix: bytes) -> int:
    """The length of the stored frame of one block (mark and checksum included) that
    ``prefix`` (its first :data:`SINGLE_PREFIX` bytes) starts; ValueError if it is not
    one."""
    block = int.from_bytes(prefix[SINGLE_PREFIX - 3 : SINGLE_PREFIX], "little")
    if prefix[: SINGLE_PREFIX - 3] != MARK + HEADER or block & 0b111 != _LAST:
        raise ValueError("not a stored frame of one block")
    return SINGLE_PREFIX + (block >> 3) + 4
