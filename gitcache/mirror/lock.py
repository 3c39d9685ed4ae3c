"""An asyncio read/write lock: many readers (snapshot generations pinning a mirror's files)
or one writer (a fetch or maintenance changing them).

Waiters are served first come, first served, consecutive readers together, so a steady
stream of readers cannot starve a fetch. Release never awaits, so a cancelled task always
gives its hold back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator


class RWLock:
    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._queue: collections.deque[tuple[bool, asyncio.Future[None]]] = collections.deque()

    @property
    def idle(self) -> bool:
        return not self._readers and not self._writer and not self._queue

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[None]:
        await self._acquire(write=False)
        try:
            yield
        finally:
            self._readers -= 1
            self._wake()

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[None]:
        await self._acquire(write=True)
        try:
            yield
        finally:
            self._writer = False
            self._wake()

    async def _acquire(self, *, write: bool) -> None:
        if not self._queue and self._grantable(write):
            self._grant(write)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((write, future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # Granted in the same step the task was cancelled: hand it back.
                if write:
                    self._writer = False
                else:
                    self._readers -= 1
            else:
                self._queue.remove((write, future))
            self._wake()
            raise

    def _grantable(self, write: bool) -> bool:
        return not self._writer and (not write or not self._readers)

    def _grant(self, write: bool) -> None:
        if write:
            self._writer = True
        else:
            self._readers += 1

    def _wake(self) -> None:
        while self._queue and self._grantable(self._queue[0][0]):
            write, future = self._queue.popleft()
            self._grant(write)
            future.set_result(None)
            if write:
                break
