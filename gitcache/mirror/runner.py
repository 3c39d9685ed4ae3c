"""The one place git subprocesses are started.

Each git child runs in its own process group, so that a timeout or a cancelled task kills
the whole group (git spawns helpers: ``git-remote-https``, ``pack-objects``, ``index-pack``)
and no child outlives the task that started it. stderr is captured and
carried, with credentials masked, into the :class:`GitError` a failure raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from gitcache.errors import GitError, GitTimeout
from gitcache.redact import mask_credentials

log = logging.getLogger(__name__)


# Git must never stop to ask a question on a terminal; messages must be stable enough to
# classify (LC_ALL=C); LFS pointers stay pointers, as in a CI checkout with skip-smudge.
BASE_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_ASKPASS": "true",
    "SSH_ASKPASS": "true",
    "GCM_INTERACTIVE": "never",
    "GIT_LFS_SKIP_SMUDGE": "1",
    "LC_ALL": "C",
}

# Commands whose output defines a snapshot's bytes also ignore the host's global and
# system git config, so that a snapshot depends on the repository alone. Network commands
# keep it: proxies and CA bundles live there.
HERMETIC_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}


def git_env(extra: Mapping[str, str] | None = None, *, hermetic: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env.update(BASE_ENV)
    if hermetic:
        env.update(HERMETIC_ENV)
    if extra:
        env.update(extra)
    return env


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_libc: ctypes.CDLL | None = None
if sys.platform == "linux":
    _libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent(parent: int) -> Callable[[], None]:
    """For the child, between fork and exec: be killed when gitcache dies, even by
    SIGKILL (the child leads its own session, so no signal to gitcache's group reaches
    it). If gitcache died before this ran, exit at once."""

    def preexec() -> None:
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the child's whole process group (it leads its own session)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


async def _reap(proc: asyncio.subprocess.Process, *streams: asyncio.StreamReader | None) -> None:
    """Kill the group, drain ``streams``, then wait for the exit. The order matters: up to
    Python 3.11, ``Process.wait()`` returns only after every pipe reached EOF, and a pipe
    whose reader is paused (its buffer full) never gets there unless it is read."""
    kill_group(proc)
    for stream in streams:
        if stream is not None and not stream.at_eof():
            with contextlib.suppress(Exception):
                await stream.read()
    await proc.wait()


async def _spawn(
    args: Sequence[str],
    *,
    cwd: Path | None,
    env: Mapping[str, str],
    stdin: int | IO[bytes] | None,
    stdout: int | IO[bytes],
) -> asyncio.subprocess.Process:
    log.debug("git %s", mask_credentials(" ".join(args)))
    return await asyncio.create_subprocess_exec(
        "git",
        *args,
        cwd=cwd,
        env=dict(env),
        stdin=stdin,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_die_with_parent(os.getpid()),
    )


def _failure(args: Sequence[str], returncode: int | None, stderr: str) -> GitError:
    last = stderr.splitlines()[-1] if stderr else f"exit status {returncode}"
    return GitError(f"git {args[0]} failed: {last}", stderr=stderr, returncode=returncode)


async def run_git(
    args: Sequence[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    stdin_path: Path | None = None,
    stdout_path: Path | None = None,
) -> bytes:
    """Run git to completion and return its stdout (or write it to ``stdout_path``,
    returning b""); its stdin is ``input`` or the file ``stdin_path``. Raises GitError or
    GitTimeout."""
    with contextlib.ExitStack() as stack:
        out: int | IO[bytes] = asyncio.subprocess.PIPE
        if stdout_path is not None:
            out = stack.enter_context(stdout_path.open("wb"))
        stdin: int | IO[bytes] | None = asyncio.subprocess.PIPE if input else None
        if stdin_path is not None:
            stdin = stack.enter_context(stdin_path.open("rb"))
        proc = await _spawn(args, cwd=cwd, env=env or git_env(), stdin=stdin, stdout=out)
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(input), timeout)
    except TimeoutError:
        raise GitTimeout(f"git {args[0]} timed out after {timeout:g}s") from None
    finally:
        await _reap(proc, proc.stdout, proc.stderr)
    if proc.returncode != 0:
        text = mask_credentials(stderr.decode("utf-8", "replace").strip())
        raise _failure(args, proc.returncode, text)
    return stdout or b""


STREAM_CHUNK = 64 * 1024  # what a streamed git's stdout is read in


async def stream_git(
    args: Sequence[str],
    *,
    input: bytes,
    timeout: float,
    env: Mapping[str, str] | None = None,
) -> AsyncGenerator[bytes, None]:
    """Run git with ``input`` on its stdin and yield its stdout as it comes; at the end
    raise GitError if it failed, or GitTimeout once ``timeout`` has passed. Closing the
    generator early kills git's group."""
    proc = await _spawn(
        args,
        cwd=None,
        env=env or git_env(),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    deadline = asyncio.get_running_loop().time() + timeout

    async def feed(stdin: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):  # git may stop reading early
            stdin.write(input)
            await stdin.drain()
            stdin.close()

    feeding = asyncio.ensure_future(feed(proc.stdin))
    stderr = asyncio.ensure_future(proc.stderr.read())
    try:
        async with asyncio.timeout_at(deadline):
            while chunk := await proc.stdout.read(STREAM_CHUNK):
                yield chunk
            await proc.wait()
            text = (await stderr).decode("utf-8", "replace").strip()
    except TimeoutError:
        raise GitTimeout(f"git {args[0]} timed out after {timeout:g}s") from None
    finally:
        feeding.cancel()
        await _reap(proc, proc.stdout)  # stderr is being read to its end already
        await asyncio.gather(feeding, stderr, return_exceptions=True)
    if proc.returncode != 0:
        raise _failure(args, proc.returncode, mask_credentials(text))
