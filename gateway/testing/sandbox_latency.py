"""A round trip for the sandbox cloud: the real one is 30-300 ms away, the sandbox ~1 ms.

On 127.0.0.1 every request is answered before the gateway has finished its own bookkeeping,
which hides every cost that scales with round trips (requests one after another, a PUBACK
held for an upload). `Latency` delays each token and import answer by the setting; it
spends half of it before the cloud handles the request (the way there) and half after (the
way back), so a point is accepted in the middle of its round trip, as on a real network.

Each request sleeps in its own handler task and nothing is locked meanwhile: eight
concurrent requests take one latency, not eight, as they would over eight connections to a
real server. The admin route (`GET`/`POST /_sandbox/latency`) is not delayed.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

__all__ = ["ADMIN_LATENCY_PATH", "Latency", "LatencySetting"]

ADMIN_LATENCY_PATH = "/_sandbox/latency"


@dataclass(frozen=True)
class LatencySetting:
    """What the sandbox adds to each answer: `latency_ms` ± up to `jitter_ms` (uniform)."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("latency_ms", "jitter_ms"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise TypeError(f"{name} must be a number of milliseconds, not {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")

    def as_json(self) -> dict[str, float]:
        return {"latency_ms": self.latency_ms, "jitter_ms": self.jitter_ms}


class Latency:
    """The current setting, its draws and the aiohttp pieces that apply it.

    `seed` makes the jitter repeatable. Lives on the sandbox's event loop like the rest of
    its state.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.setting = LatencySetting()
        self.in_round_trip = 0  # requests sleeping in their added latency right now
        self._random = random.Random(seed)

    def set(self, latency_ms: float, jitter_ms: float = 0.0) -> LatencySetting:
        self.setting = LatencySetting(latency_ms, jitter_ms)
        return self.setting

    @property
    def active(self) -> bool:
        return self.setting.latency_ms > 0 or self.setting.jitter_ms > 0

    def draw_s(self) -> float:
        """One answer's whole added delay, in seconds (never below 0)."""
        latency, jitter = self.setting.latency_ms, self.setting.jitter_ms
        if jitter <= 0:
            return latency / 1000
        return max(0.0, self._random.uniform(latency - jitter, latency + jitter)) / 1000

    def middleware(self, paths: Collection[str]) -> Middleware:
        """Delays the answers to requests for `paths`; every other path passes at once."""

        @web.middleware
        async def delay_answers(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path not in paths or not self.active:
                return await handler(request)
            half_s = self.draw_s() / 2
            self.in_round_trip += 1
            try:
                await asyncio.sleep(half_s)  # the way there
                response = await handler(request)
                await asyncio.sleep(half_s)  # the way back
            finally:
                self.in_round_trip -= 1
            return response

        return delay_answers

    async def admin(self, request: web.Request) -> web.Response:
        """GET: the setting; POST `{"latency_ms": 100, "jitter_ms": 0}`: change it."""
        if request.method == "POST":
            try:
                data: Any = await request.json()
            except ValueError:
                raise web.HTTPBadRequest(text="body must be JSON") from None
            if not isinstance(data, dict):
                raise web.HTTPBadRequest(text="body must be a JSON object")
            unknown = set(data) - {"latency_ms", "jitter_ms"}
            if unknown:
                raise web.HTTPBadRequest(text=f"unknown keys {sorted(unknown)}")
            try:
                self.set(data.get("latency_ms", 0.0), data.get("jitter_ms", 0.0))
            except (ValueError, TypeError) as exc:
                raise web.HTTPBadRequest(text=str(exc)) from None
        return web.json_response(self.setting.as_json())
