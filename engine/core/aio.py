"""asyncio helpers the daemon's tasks share.

It must never block the event loop or swallow a cancellation: a task that
ignores its cancel hangs the daemon's shutdown.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def until_woken(wake: asyncio.Event, timeout: float) -> None:
    """A task's idle wait: until `wake` is set anew (it is cleared first) or the time is up."""
    wake.clear()
    await wait_event(wake, timeout)


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Until the event is set or the time is up. Not asyncio.wait_for: on Python 3.11 it can swallow a
    cancellation that arrives as the event is set, and a task that ignores its cancel hangs shutdown."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()


async def get_within(queue: asyncio.Queue, timeout: float) -> Any:
    """The queue's next item, or None if none comes within `timeout` (cancellation-safe, as wait_event)."""
    getter = asyncio.ensure_future(queue.get())
    try:
        await asyncio.wait({getter}, timeout=timeout)
    finally:
        if not getter.done():
            getter.cancel()
    return getter.result() if getter.done() and not getter.cancelled() else None
