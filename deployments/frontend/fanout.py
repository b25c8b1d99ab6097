"""n > 1: several choices of one request, started after the first and merged as they come."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def more_choices(first: AsyncIterator[T], n: int, start: Callable[[int], Awaitable[AsyncIterator[T]]]
                       ) -> list[AsyncIterator[T]]:
    """The other choices start once the first has its first output, so its prompt's full KV
    blocks are in the prefix cache and they compute only the rest (on the same replica; the
    router may put them on another, which then computes the prompt again). `start(i)` starts
    choice i. If a choice cannot start, the started ones are cancelled and the error is the
    request's."""
    head = await anext(first, None)
    streams: list[AsyncIterator[T]] = [_prepend(head, first)]
    try:
        for i in range(1, n):
            streams.append(await start(i))
    except BaseException:
        await close_all(streams)
        raise
    return streams


async def close_all(streams: list[AsyncIterator[T]]) -> None:
    """Cancels started requests (each stream's close cancels its request on the pool)."""
    for stream in streams:
        await stream.aclose()  # type: ignore[attr-defined]


async def _prepend(head: T | None, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    try:
        if head is not None:
            yield head
        async for c in rest:
            yield c
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


async def merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """The choices' outputs as they come, tagged with their index; closing this (a client that
    went away) cancels every choice's request."""
    if len(streams) == 1:
        async for c in streams[0]:
            yield 0, c
        return
    queue: asyncio.Queue[tuple[int, T | None, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for c in stream:
                await queue.put((i, c, None))
            await queue.put((i, None, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((i, None, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, c, exc = await queue.get()
            if exc is not None:
                raise exc
            if c is None:
                remaining -= 1
                continue
            yield i, c
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
