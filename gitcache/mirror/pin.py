"""Pinning a mirror's immutable files: hard links to its packs and loose objects, taken
under the mirror's read lock in milliseconds, keep those exact files readable after the
lock is released, whatever a fetch or a repack does to the mirror meanwhile."""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

_PACK_FILE = re.compile(r"pack-[0-9a-f]+\.(pack|idx|rev|bitmap)")
_LOOSE_DIR = re.compile(r"[0-9a-f]{2}")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copy2(src, dst)


def pin_objects(git_dir: Path, work: Path) -> list[str]:
    """Hard-link every complete pack and every loose object of ``git_dir`` into ``work``;
    return their paths relative to ``work`` (``objects/pack/pack-….pack``, …)."""
    objects = git_dir / "objects"
    pinned: list[str] = []
    pack_dir = objects / "pack"
    names = set(os.listdir(pack_dir)) if pack_dir.is_dir() else set()
    (work / "objects" / "pack").mkdir(parents=True, exist_ok=True)
    for name in sorted(names):
        # A pack counts only with its index: an .idx is renamed into place last.
        if _PACK_FILE.fullmatch(name) and name.rsplit(".", 1)[0] + ".idx" in names:
            _link_or_copy(pack_dir / name, work / "objects" / "pack" / name)
            pinned.append(f"objects/pack/{name}")
    for sub in sorted(os.listdir(objects)):
        if not _LOOSE_DIR.fullmatch(sub):
            continue
        (work / "objects" / sub).mkdir(exist_ok=True)
        for name in sorted(os.listdir(objects / sub)):
            if not name.startswith("tmp_"):
                _link_or_copy(objects / sub / name, work / "objects" / sub / name)
                pinned.append(f"objects/{sub}/{name}")
    return pinned
