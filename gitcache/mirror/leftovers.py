"""What a gitcache killed outright may leave behind, made safe before the next one starts:
git processes still working in the state directory, and their lock files in mirrors.

git children die with gitcache (a parent-death signal, see ``runner``), but their own
helpers (``git-remote-http``, ``index-pack``) only notice when they next read or write
their pipe, which a slow upstream may delay; and a child killed mid-write leaves its
``*.lock`` files, which would make the next fetch fail (``cannot lock ref``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

GONE_WITHIN = 2.0  # seconds to wait for killed orphans to exit


def _is_ours(pid: int, state: str) -> bool:
    """A git process whose working directory or arguments are inside ``state``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False  # gone, or not ours to look at
    if not argv or not os.path.basename(argv[0]).startswith(b"git"):
        return False
    inside = cwd == state or cwd.startswith(state + os.sep)
    return inside or any(state.encode() in arg for arg in argv)


def working_in(state_dir: Path) -> list[int]:
    """The git processes (other than this one) working in ``state_dir``."""
    if not Path("/proc/self").exists():
        return []  # not Linux: nothing to look at
    state, me = os.path.realpath(state_dir), os.getpid()
    pids = (int(e.name) for e in os.scandir("/proc") if e.name.isdigit())
    return [pid for pid in pids if pid != me and _is_ours(pid, state)]


def reap_orphans(state_dir: Path) -> int:
    """SIGKILL the process group of every git process a previous gitcache left working in
    ``state_dir``, and wait for them to exit; how many there were."""
    my_group = os.getpgrp()
    orphans = working_in(state_dir)
    for pid in orphans:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            group = os.getpgid(pid)
            if group != my_group:
                os.killpg(group, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        log.warning("killed git process %d left running by a previous gitcache", pid)
    deadline = time.monotonic() + GONE_WITHIN
    while working_in(state_dir) and time.monotonic() < deadline:
        time.sleep(0.02)
    return len(orphans)


def remove_stale_locks(git_dir: Path) -> list[Path]:
    """Lock files left by a killed git. Safe only when no git of ours is writing to the
    mirror: under its write lock, or at start-up once orphans are gone."""
    stale = [p for p in git_dir.rglob("*.lock") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def clear_mirror_locks(mirrors: Path) -> None:
    """At start-up: the lock files in every mirror under ``mirrors``."""
    for git_dir in mirrors.glob("*/*.git"):
        for path in remove_stale_locks(git_dir):
            log.warning("removed stale lock file %s", path)
