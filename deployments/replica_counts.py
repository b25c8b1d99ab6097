"""How many replicas of each pool are RUNNING, as Serve's controller reports them, without ever
asking the controller on the event loop.

`serve.status()` is a blocking call that builds the whole instance's details (on a busy 2-core
host ~0.2 s of CPU, a quarter of the ingress's CPU under a burst of 600 requests when it ran per
pool per second on the event loop, so every request queued behind it, 429 refusals included).
Here one cheaper call covers every pool, runs in a thread, and only while someone asks
(stale-while-refreshing): an idle ingress polls nothing, a busy one at most once per `period_s`."""

from __future__ import annotations

import asyncio
import logging
import time

from ray.serve.context import _get_global_client

log = logging.getLogger(__name__)


def _running(app_name: str) -> dict[str, int]:
    """RUNNING replicas per deployment of the application (blocking: a controller call). Reads
    the controller's details as the plain dict it sends: serve.status() turns the same dict into
    pydantic models first, which cloudpickles each deployment's request-router class (most of
    its cost in the ingress)."""
    details = _get_global_client().get_serve_details()
    app = (details.get("applications") or {}).get(app_name)
    if app is None:
        return {}
    return {name: sum(str(getattr(r["state"], "value", r["state"])) == "RUNNING" for r in dep.get("replicas", ()))
            for name, dep in app["deployments"].items()}


class ReplicaCounts:
    """The router's view of each deployment's RUNNING replicas, at most `period_s` old while in use."""

    def __init__(self, app_name: str, period_s: float = 1.0) -> None:
        self.app_name = app_name
        self.period_s = period_s
        self._counts: dict[str, int] | None = None   # None until the first answer
        self._at = float("-inf")
        self._refreshing: asyncio.Task | None = None

    def get(self, deployment: str) -> int | None:
        """The last known count (None while none is known yet); starts a refresh in the background
        when it is older than `period_s`. Called on the event loop."""
        if time.monotonic() - self._at >= self.period_s and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.get_running_loop().create_task(self.refresh())
        return None if self._counts is None else self._counts.get(deployment, 0)

    async def known(self, deployment: str) -> int:
        """The count, waiting for the controller's answer (off the loop) when none is known yet:
        the read get() has in flight, not a second one."""
        count = self.get(deployment)
        if count is None and self._refreshing is not None:
            await asyncio.shield(self._refreshing)  # a cancelled caller leaves the read to finish
            count = self.get(deployment)
        return count or 0

    async def refresh(self) -> dict[str, int]:
        """Asks the controller now (in a thread) and keeps the answer; on failure keeps the old one."""
        try:
            counts = await asyncio.to_thread(_running, self.app_name)
        except Exception as exc:  # noqa: BLE001 - a controller hiccup must not fail requests
            log.warning("could not read the replica states: %r", exc)
            self._at = time.monotonic()
            return self._counts or {}
        self._counts, self._at = counts, time.monotonic()
        return counts
