"""gitcache as a real process: ``python -m gitcache.cli serve`` with a config file, on a
free loopback port, as an operator would run it."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers import HOST
from tests.servers import free_port
from tests.upstream import Upstream
from tests.waiting import until


def to_toml(tables: dict[str, dict[str, Any]]) -> str:
    """Tables of scalars (dotted names for nested tables) as TOML; JSON's quoting of
    strings and lists is valid TOML."""
    lines = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            text = str(value).lower() if isinstance(value, bool) else json.dumps(value)
            lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


@dataclass
class GitcacheProcess:
    proc: asyncio.subprocess.Process
    base: str
    state_dir: Path

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 30)


async def start_gitcache(
    tmp_path: Path, name: str, upstream: Upstream, **sections: dict[str, Any]
) -> GitcacheProcess:
    """Start gitcache with its own state directory under ``tmp_path``; keyword arguments
    are config sections (``cache_s3`` for ``[cache.s3]``). Returns once it is ready."""
    port = free_port()
    state_dir = tmp_path / name
    tables: dict[str, dict[str, Any]] = {
        "server": {"listen": f"127.0.0.1:{port}", "state_dir": str(state_dir)},
        f'upstreams."{HOST}"': {"url": upstream.url("{repo}"), "allow_private": True},
    }
    for section, values in sections.items():
        tables.setdefault(section.replace("_", "."), {}).update(values)
    config = tmp_path / f"{name}.toml"
    config.write_text(to_toml(tables))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gitcache.cli", "serve", "--config", str(config)
    )
    process = GitcacheProcess(proc, f"http://127.0.0.1:{port}", state_dir)

    async def ready() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"gitcache {name} exited with {proc.returncode}")
        try:
            async with session.get(f"{process.base}/readyz") as response:
                return response.status == 200
        except aiohttp.ClientConnectionError:
            return False

    try:
        async with aiohttp.ClientSession() as session:
            await until(ready, f"gitcache {name} to be ready", 20)
    except AssertionError:
        await process.stop()
        raise
    return process
