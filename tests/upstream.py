"""A real git upstream for tests: bare repositories served by ``git http-backend`` (CGI)
behind an aiohttp server on port 0, and helpers to build repositories to serve."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web


def git(*args: str, cwd: Path | None = None, input: bytes | None = None) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, input=input, capture_output=True, check=False)
    if result.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {result.stderr.decode()}")
    return result.stdout.decode()


@dataclass
class Upstream:
    """Serves ``root/<name>.git`` at ``http://127.0.0.1:<port>/<name>.git``."""

    root: Path
    requests: list[tuple[str, str]] = field(default_factory=list)
    fail: bool = False  # answer every request with 500
    delay: float = 0.0  # seconds before answering (or until release())
    users: dict[str, str] | None = None  # when set, Basic auth with one of these is required
    port: int = 0

    _released: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        """Answer the requests held by ``delay`` now, and every later one at once."""
        self.delay = 0
        self._released.set()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}.git"

    def clones(self, name: str) -> int:
        """Ref advertisements asked for ``name``: one per clone, fetch or ls-remote."""
        path = f"/{name}.git/info/refs"
        return sum(1 for p, q in self.requests if p == path and "upload-pack" in q)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.path, request.query_string))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._released.wait(), self.delay)
        if self.fail:
            return web.Response(status=500, text="upstream is down")
        if self.users is not None and not self._authorized(request):
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="test"'})
        env = {
            "PATH": os.environ["PATH"],
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "HOME": str(self.root),
            "PATH_INFO": request.path,
            "QUERY_STRING": request.query_string,
            "REQUEST_METHOD": request.method,
            "CONTENT_TYPE": request.headers.get("Content-Type", ""),
            "REMOTE_ADDR": "127.0.0.1",
            "GIT_PROTOCOL": request.headers.get("Git-Protocol", ""),
        }
        body = await request.read()  # aiohttp already undid any Content-Encoding
        proc = await asyncio.create_subprocess_exec(
            "git",
            "http-backend",
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, _ = await proc.communicate(body)
        head, _, payload = out.partition(b"\r\n\r\n")
        status, headers = 200, {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers[name] = value.strip()
        return web.Response(status=status, headers=headers, body=payload)

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Basic":
            return False
        user, _, password = base64.b64decode(value).decode().partition(":")
        return self.users is not None and self.users.get(user) == password

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    # --- building repositories --------------------------------------------------------

    def create(self, name: str, work: Path) -> Path:
        """Push the repository in ``work`` (all branches and tags) to ``root/name.git``."""
        bare = self.root / f"{name}.git"
        bare.parent.mkdir(parents=True, exist_ok=True)
        git("init", "--bare", "-q", str(bare))
        git("push", "-q", "--mirror", str(bare), cwd=work)
        head = git("symbolic-ref", "HEAD", cwd=work).strip()
        git("symbolic-ref", "HEAD", head, cwd=bare)
        return bare


def commit_all(work: Path, message: str) -> str:
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", message, cwd=work)
    return git("rev-parse", "HEAD", cwd=work).strip()


def make_rich_repo(work: Path) -> dict[str, str]:
    """A repository with everything a snapshot must reproduce: symlinks, exec bits,
    ``eol=crlf``, export-ignore and export-subst attributes, names over 100 bytes,
    non-ASCII names, a submodule gitlink, several branches, and both kinds of tags."""
    git("init", "-q", "-b", "main", str(work))
    (work / "README.md").write_text("# rich\n")
    (work / "bin").mkdir()
    (work / "bin" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (work / "bin" / "run.sh").chmod(0o755)
    (work / "link").symlink_to("README.md")
    (work / "dirlink").symlink_to("bin")
    (work / ".gitattributes").write_text(
        "*.bat eol=crlf\nignored.txt export-ignore\nsubst.txt export-subst\n"
    )
    (work / "dos.bat").write_text("@echo off\necho one\necho two\n")
    (work / "ignored.txt").write_text("export-ignore must not drop me from a checkout\n")
    (work / "subst.txt").write_text("commit: $Format:%H$\n")
    long_dir = work / ("d" * 70) / ("e" * 70)
    long_dir.mkdir(parents=True)
    (long_dir / ("f" * 90 + ".txt")).write_text("a path of over 200 bytes\n")
    (work / "ünïcødé").mkdir()
    (work / "ünïcødé" / "日本語.txt").write_text("こんにちは\n")
    (work / "empty").write_text("")
    (work / "binary.bin").write_bytes(bytes(range(256)) * 64)
    first = commit_all(work, "first")
    (work / ".gitmodules").write_text(
        '[submodule "vendor/sub"]\n\tpath = vendor/sub\n\turl = https://example.invalid/sub.git\n'
    )
    git("update-index", "--add", "--cacheinfo", f"160000,{first},vendor/sub", cwd=work)
    git("add", ".gitmodules", cwd=work)
    git("commit", "-q", "-m", "second: a submodule", cwd=work)
    second = git("rev-parse", "HEAD", cwd=work).strip()
    git("tag", "-a", "v1.0", "-m", "release 1.0", first, cwd=work)
    git("tag", "light", second, cwd=work)
    git("branch", "feature", first, cwd=work)
    return {"first": first, "second": second}


async def agit(*args: str, cwd: Path | None = None) -> str:
    """``git`` off the event loop: needed whenever git talks to the test upstream, which
    is served by the same loop."""
    return await asyncio.to_thread(git, *args, cwd=cwd)


def make_big_repo(work: Path, megabytes: int, files: int = 8) -> str:
    """Incompressible content, so a snapshot stream lasts long enough to be interrupted."""
    git("init", "-q", "-b", "main", str(work))
    for i in range(files):
        (work / f"blob{i}.bin").write_bytes(os.urandom(megabytes * 1024 * 1024 // files))
    return commit_all(work, "big")
