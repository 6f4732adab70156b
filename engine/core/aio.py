"""asyncio helpers the daemon's tasks share.

It must never block the event loop or swallow a cancellation: a task that
ignores its cancel hangs the daemon's shutdown.
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Until the event is set or the time is up. Not asyncio.wait_for: on Python 3.11 it can swallow a
    cancellation that arrives as the event is set, and a task that ignores its cancel hangs shutdown."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
