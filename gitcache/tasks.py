"""Work owned by the application rather than by a request.

A client that disconnects cancels its handler; work other clients share (a clone, a fetch,
a snapshot generation) must not die with it. Such work runs as a task in an app-owned
:class:`TaskSet`, which shutdown cancels and awaits, and requests wait on it through
``asyncio.shield``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class TaskSet:
    """Holds strong references to background tasks and cancels them all on close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
        if self._closed:
            coro.close()
            raise RuntimeError("the application is shutting down")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Retrieve it so asyncio does not warn; whoever awaited it has handled it.
            log.debug("task %s failed: %r", task.get_name(), task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def settle(self, prefix: str = "") -> None:
        """Until every task whose name starts with ``prefix`` has ended, those started
        meanwhile included."""
        while tasks := [t for t in self._tasks if t.get_name().startswith(prefix)]:
            await asyncio.wait(tasks)

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Coalescer(Generic[T]):
    """At most one run of the work for each key at a time; callers that arrive while it
    runs share its result. The work survives the cancellation of any caller."""

    def __init__(self, tasks: TaskSet) -> None:
        self._tasks = tasks
        self._running: dict[Hashable, asyncio.Task[T]] = {}

    def running(self, key: Hashable) -> bool:
        return key in self._running

    async def run(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        task = self._running.get(key)
        if task is None:

            async def wrapper() -> T:
                try:
                    return await work()
                finally:
                    self._running.pop(key, None)

            task = self._tasks.spawn(wrapper(), name=f"coalesced:{key}")
            self._running[key] = task
        return await asyncio.shield(task)


async def run_blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` in a worker thread. Unlike ``asyncio.to_thread``, a cancelled caller still
    waits for the thread to return, so the caller's cleanup (closing the file the thread
    writes to) cannot race with it."""
    future = asyncio.get_running_loop().run_in_executor(
        None, functools.partial(fn, *args, **kwargs)
    )
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await asyncio.wait([future])
        raise
