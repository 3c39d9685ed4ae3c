"""The one place git subprocesses are started.

Each git child runs in its own process group, so that a timeout or a cancelled task kills
the whole group (git spawns helpers: ``git-remote-https``, ``pack-objects``, ``index-pack``)
and no child outlives the task that started it. stderr is captured (the tail of it) and
carried, with credentials masked, into the :class:`GitError` a failure raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

from gitcache.errors import GitError, GitTimeout
from gitcache.redact import mask_credentials

log = logging.getLogger(__name__)

STDERR_TAIL = 8192
PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux

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


class _StderrTail:
    """Drains a child's stderr so it can never block on a full pipe; keeps the tail."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self._buffer = bytearray()
        self._task = asyncio.ensure_future(self._drain(stream))

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            self._buffer += chunk
            del self._buffer[:-STDERR_TAIL]

    async def text(self) -> str:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._task), 1.0)
        self._task.cancel()
        return mask_credentials(self._buffer.decode("utf-8", "replace").strip())


async def _spawn(
    args: Sequence[str], *, cwd: Path | None, env: Mapping[str, str], stdin: int | None
) -> asyncio.subprocess.Process:
    log.debug("git %s", mask_credentials(" ".join(args)))
    return await asyncio.create_subprocess_exec(
        "git",
        *args,
        cwd=cwd,
        env=dict(env),
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )


def _widen_pipe(proc: asyncio.subprocess.Process) -> None:
    """Grow the stdout pipe from 64 KiB to 1 MiB: git then runs ahead of its reader instead
    of waking it for every 64 KiB, which roughly halves the cost of a bulk stream."""
    # Best effort: a child that already exited has closed the pipe, and it no longer matters.
    with contextlib.suppress(OSError, ValueError, AttributeError):
        transport = proc._transport  # type: ignore[attr-defined]
        pipe = transport.get_pipe_transport(1).get_extra_info("pipe")
        fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, PIPE_SIZE)


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
) -> bytes:
    """Run git to completion and return its stdout; raise GitError or GitTimeout."""
    proc = await _spawn(
        args, cwd=cwd, env=env or git_env(), stdin=asyncio.subprocess.PIPE if input else None
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(input), timeout)
    except TimeoutError:
        raise GitTimeout(f"git {args[0]} timed out after {timeout:g}s") from None
    finally:
        await _reap(proc, proc.stdout, proc.stderr)
    if proc.returncode != 0:
        text = mask_credentials(stderr.decode("utf-8", "replace").strip())
        raise _failure(args, proc.returncode, text)
    return stdout


class GitStream:
    """A running git command whose stdout is read by the caller."""

    def __init__(self, args: Sequence[str], proc: asyncio.subprocess.Process) -> None:
        self.args = args
        self.proc = proc
        assert proc.stdout is not None and proc.stderr is not None
        self.stdout: asyncio.StreamReader = proc.stdout
        self._stderr = _StderrTail(proc.stderr)

    async def check(self) -> None:
        """Wait for the exit (stdout must be drained first) and raise if git failed."""
        returncode = await self.proc.wait()
        if returncode != 0:
            raise _failure(self.args, returncode, await self._stderr.text())


@contextlib.asynccontextmanager
async def stream_git(
    args: Sequence[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> AsyncIterator[GitStream]:
    """Start git with stdout piped to the caller; whatever way the block is left, the
    process group is killed and reaped."""
    proc = await _spawn(args, cwd=cwd, env=env or git_env(), stdin=None)
    _widen_pipe(proc)
    stream = GitStream(args, proc)
    try:
        yield stream
    finally:
        kill_group(proc)
        await stream._stderr.text()  # drains stderr to EOF (or gives up after a second)
        await _reap(proc, proc.stdout, proc.stderr)
