"""The mirror read/write lock: readers share, a writer excludes, nobody starves."""

from __future__ import annotations

import asyncio

from gitcache.mirror.lock import RWLock


async def test_readers_share_writer_excludes_and_is_not_starved() -> None:
    lock = RWLock()
    events: list[str] = []

    async def reader(name: str, hold: float) -> None:
        async with lock.read():
            events.append(f"+{name}")
            await asyncio.sleep(hold)
            events.append(f"-{name}")

    async def writer() -> None:
        async with lock.write():
            events.append("+w")
            await asyncio.sleep(0.01)
            events.append("-w")

    r1 = asyncio.create_task(reader("r1", 0.05))
    await asyncio.sleep(0)
    w = asyncio.create_task(writer())
    await asyncio.sleep(0)
    r2 = asyncio.create_task(reader("r2", 0.01))  # arrives after the writer: waits for it
    await asyncio.gather(r1, w, r2)
    assert events == ["+r1", "-r1", "+w", "-w", "+r2", "-r2"]
    assert lock.idle


async def test_cancelled_waiter_gives_its_place_back() -> None:
    lock = RWLock()
    async with lock.read():
        waiting = asyncio.create_task(lock.write().__aenter__())
        await asyncio.sleep(0)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
    async with lock.write():
        pass
    assert lock.idle
