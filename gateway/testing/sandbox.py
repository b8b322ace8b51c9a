"""A Blynk-compatible fake cloud for the demo and the tests.

The real cloud cannot be made to fail on demand, cannot be time-travelled, and its behaviour in
the undocumented corners (quota, too-old timestamps, bad values) is unknown. The sandbox answers
those corners deterministically, so the gateway's retry/backoff/quota logic can be exercised
against a real HTTP server without network access. Where the Blynk documentation is silent
(see ``blynk-import-api.md``) the sandbox picks a strict, all-or-nothing answer: it is safer for
the gateway to be tested against a cloud that is harsher than the real one.

Threading model: every piece of state lives on the event loop that ran :meth:`SandboxCloud.start`.
Async tests call the methods directly; sync code uses `sandbox_run.SandboxThread`. What the
cloud accepts (datastream types, value rules) is in `sandbox_rules`. Run standalone with
``blynk-gateway sandbox --devices "101:5=double,6=string"``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import json
import math
import secrets
import socket
import struct
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import BasicAuth, web
from aiohttp.typedefs import Handler

from gateway.testing.sandbox_latency import ADMIN_LATENCY_PATH, Latency, LatencySetting
from gateway.testing.sandbox_rules import BAD_TOKENS, check_types, short_repr, value_fits

__all__ = [
    "FAULT_MODES",
    "IMPORT_PATH",
    "MAX_REQUEST_BYTES",
    "STATUS_RESET",
    "TOKEN_PATH",
    "AcceptedPoint",
    "RequestRecord",
    "SandboxCloud",
]

T = TypeVar("T")

IMPORT_PATH = "/api/v1/organization/device/import/batch"
TOKEN_PATH = "/oauth2/token"
# Blynk documents "2 MB"; the binary reading is the more permissive one, so a body the sandbox
# accepts is never one the gateway could not also send to the real cloud in practice.
MAX_REQUEST_BYTES = 2 * 1024 * 1024
DAY_MS = 86_400_000
FAULT_MODES = frozenset({"none", "down", "error500", "rate_limit", "slow", "reset", "unauthorized"})
# A reset request never gets an HTTP status; the request log still needs one.
STATUS_RESET = 0
# How long stop() lets an in-flight handler finish before cancelling it: short, because a fake
# cloud being stopped has no reply worth waiting for.
_SHUTDOWN_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class AcceptedPoint:
    """One stored value; frozen so tests can compare and hash them."""

    device_id: int
    datastream_id: int
    ts: int
    value: object


@dataclass(frozen=True)
class RequestRecord:
    """One import request as the cloud saw it.

    ``device_id``/``datastream_id``/``n_values`` are best-effort: they are filled from the body
    whenever it parses, even when the request was refused before validation (fault, 401, 308),
    so tests can tell which upload was refused. ``status`` is :data:`STATUS_RESET` for a
    connection aborted by the "reset" fault.
    """

    status: int
    device_id: int | None
    datastream_id: int | None
    n_values: int
    message: str | None
    # When the cloud handled it (time.monotonic(), the same clock in every process here):
    # a budget test counts the requests in any 60 s from these.
    at_s: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class _Fault:
    mode: str
    remaining: int | None = None
    retry_after_s: float | None = None
    delay_s: float = 0.0


class _Reject(Exception):
    """Carries a refusal out of the validation chain, keeping each step a plain function."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status, headers=headers)


class SandboxCloud:
    """The fake cloud. All methods must be called on the loop that ran :meth:`start`.

    Only :meth:`start`, :meth:`stop` and :meth:`set_fault` are coroutines (they open or close
    the listening socket); every other control is a plain synchronous method.
    """

    def __init__(
        self,
        devices: Mapping[int, Mapping[int, str]],
        *,
        client_id: str = "sandbox-client",
        client_secret: str = "sandbox-secret",
        daily_points_limit: int = 10_000,
        max_age_days: int = 30,
        token_ttl_s: int = 86_400,
    ) -> None:
        self._devices: dict[int, dict[int, str]] = {
            dev: check_types(streams) for dev, streams in devices.items()
        }
        self.client_id = client_id
        self.client_secret = client_secret
        self.daily_points_limit = daily_points_limit
        self.max_age_days = max_age_days
        self.token_ttl_s = token_ttl_s
        # When set, every import is answered 308 towards this base URL (wrong-region simulation).
        self.redirect_to: str | None = None
        # When set (a key of `sandbox_rules.BAD_TOKENS`), the token endpoint answers 200 with
        # that malformed access (and refresh) token.
        self.bad_tokens: str | None = None

        self._clock_offset_ms = 0.0
        self._tokens: dict[str, int] = {}  # access token -> expiry (sandbox ms)
        self._refresh_tokens: set[str] = set()
        self._token_requests = 0
        self._tokens_issued = 0
        self._fault = _Fault("none")
        self._accepted: list[AcceptedPoint] = []
        self._requests: list[RequestRecord] = []
        self._quota: Counter[tuple[int, dt.date]] = Counter()

        self._host = "127.0.0.1"
        self._port: int | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        # Transports with a handler running: "down" lets those finish their reply and
        # closes the idle ones at once.
        self._busy: set[asyncio.BaseTransport] = set()
        self._sleeping: set[asyncio.Task[Any]] = set()
        self._latency = Latency()

    # ------------------------------------------------------------------ lifecycle
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen; port 0 picks a free one, which is then kept across "down" faults."""
        if self._runner is not None:
            raise RuntimeError("sandbox already started")
        delay = self._latency.middleware((TOKEN_PATH, IMPORT_PATH))
        app = web.Application(
            client_max_size=MAX_REQUEST_BYTES, middlewares=[self._track_busy, delay]
        )
        app.router.add_post(TOKEN_PATH, self._handle_token)
        app.router.add_post(IMPORT_PATH, self._handle_import)
        app.router.add_get("/_sandbox/state", self._admin_state)
        app.router.add_post("/_sandbox/fault", self._admin_fault)
        app.router.add_post("/_sandbox/clock", self._admin_clock)
        app.router.add_get("/_sandbox/points", self._admin_points)
        app.router.add_post("/_sandbox/revoke", self._admin_revoke)
        app.router.add_post("/_sandbox/precount", self._admin_precount)
        app.router.add_get(ADMIN_LATENCY_PATH, self._latency.admin)
        app.router.add_post(ADMIN_LATENCY_PATH, self._latency.admin)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        self._runner = runner
        self._host = host
        self._port = None  # a restart after stop() may get a different port
        if self._fault.mode == "down":
            self._fault = _Fault("none")
        try:
            await self._listen(port)
        except BaseException:
            self._runner = None
            await runner.cleanup()
            raise
        return self.base_url

    async def stop(self) -> None:
        """Close the socket and every connection; safe to call twice or while "down"."""
        runner, self._runner, self._site = self._runner, None, None
        for task in list(self._sleeping):
            task.cancel()  # a "slow" delay must not hold up the shutdown
        if runner is not None:
            await runner.cleanup()

    async def _listen(self, port: int) -> None:
        assert self._runner is not None
        site = web.TCPSite(self._runner, self._host, port)
        await site.start()
        self._site = site
        if self._port is None:
            self._port = int(self._runner.addresses[0][1])

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("sandbox not started")
        return self._port

    @property
    def base_url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    # ------------------------------------------------------------------ faults
    async def set_fault(
        self,
        mode: str,
        *,
        count: int | None = None,
        retry_after_s: float | None = None,
        delay_s: float = 0.0,
    ) -> None:
        """Switch the failure mode; a coroutine because "down" and back close/reopen the socket.

        When this returns after "down", new connections are refused and idle keep-alive
        connections are closed; after leaving "down" the same port is listening again.
        """
        if mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {mode!r}; use one of {sorted(FAULT_MODES)}")
        if count is not None and count < 1:
            raise ValueError("count must be >= 1 (or None for 'until changed')")
        if mode == "down" and count is not None:
            raise ValueError("'down' refuses connections, so there are no requests to count")
        if retry_after_s is not None and retry_after_s < 0:
            raise ValueError("retry_after_s must be >= 0")
        if delay_s < 0:
            raise ValueError("delay_s must be >= 0")
        was_down = self._fault.mode == "down"
        new = _Fault(mode, count, retry_after_s, delay_s)
        if mode == "down" and not was_down:
            if self._runner is None:
                raise RuntimeError("start the sandbox before taking it down")
            self._fault = new
            await self._go_down()
        elif was_down and mode != "down":
            if self._runner is not None:
                await self._listen(self.port)  # stays "down" if the port was taken meanwhile
            self._fault = new
        else:
            self._fault = new

    async def _go_down(self) -> None:
        site, self._site = self._site, None
        if site is not None:
            await site.stop()  # closes the listening socket; the port is free right away
        server = self._runner.server if self._runner is not None else None
        if server is None:
            return
        idle = []
        for conn in server.connections:
            if conn.transport is not None and conn.transport in self._busy:
                conn.close()  # after the current reply
            else:
                conn.force_close()
                idle.append(conn)
        # transport.close() only schedules the socket close; wait for it so that a client
        # reusing a pooled connection right after set_fault() returns sees it closed (and
        # reconnects, getting refused) instead of racing the close with a request.
        for _ in range(1000):  # at most ~1 s
            if not any(c in server.connections for c in idle):
                break
            await asyncio.sleep(0.001)

    @property
    def fault(self) -> str:
        return self._fault.mode

    def _take_fault(self) -> _Fault | None:
        """The fault hitting this import request, counting it down."""
        fault = self._fault
        if fault.mode in ("none", "down"):
            return None
        if fault.remaining is not None:
            left = fault.remaining - 1
            self._fault = (
                _Fault("none")
                if left == 0
                else _Fault(fault.mode, left, fault.retry_after_s, fault.delay_s)
            )
        return fault

    def set_redirect(self, base_url: str | None) -> None:
        """Answer every import with 308 towards ``base_url`` (None: stop redirecting)."""
        self.redirect_to = base_url

    def revoke_tokens(self) -> None:
        """Invalidate every issued token, as a cloud-side rotation would."""
        self._tokens.clear()
        self._refresh_tokens.clear()

    # ------------------------------------------------------------------ latency
    def set_latency(self, latency_ms: float, *, jitter_ms: float = 0.0) -> LatencySetting:
        """Answer every token and import request `latency_ms` (± `jitter_ms`) late, as a
        cloud a round trip away would (`sandbox_latency`); a fault's `delay_s` adds to it."""
        return self._latency.set(latency_ms, jitter_ms)

    @property
    def latency(self) -> LatencySetting:
        return self._latency.setting

    @property
    def requests_in_round_trip(self) -> int:
        """Token and import requests in their added latency right now."""
        return self._latency.in_round_trip

    # ------------------------------------------------------------------ clock and quota
    def now_ms(self) -> int:
        return int(time.time() * 1000 + self._clock_offset_ms)

    def advance_clock(self, seconds: float) -> None:
        """Time travel: expires tokens, ages timestamps and rolls quota days without waiting."""
        self._clock_offset_ms += seconds * 1000

    def set_clock(self, epoch_ms: int) -> None:
        self._clock_offset_ms = epoch_ms - time.time() * 1000

    def today(self) -> dt.date:
        return dt.datetime.fromtimestamp(self.now_ms() / 1000, dt.UTC).date()

    def precount(self, device_id: int, n: int, day: dt.date | None = None) -> None:
        """Spend quota as if the device had uploaded ``n`` points directly (shared quota)."""
        self._quota[(device_id, day or self.today())] += n

    def quota_used(self, device_id: int, day: dt.date | None = None) -> int:
        return self._quota[(device_id, day or self.today())]

    def add_device(self, device_id: int, datastreams: Mapping[int, str]) -> None:
        """Create or replace a device with its ``{datastream_id: type}`` map."""
        self._devices[device_id] = check_types(datastreams)

    # ------------------------------------------------------------------ queries
    @property
    def accepted(self) -> list[AcceptedPoint]:
        """A copy, so a caller on another thread never iterates a list being appended to."""
        return list(self._accepted)

    @property
    def requests(self) -> list[RequestRecord]:
        return list(self._requests)

    def accepted_count(self, device_id: int | None = None) -> int:
        if device_id is None:
            return len(self._accepted)
        return sum(1 for p in self._accepted if p.device_id == device_id)

    @property
    def delayed_imports(self) -> int:
        """Import requests being held by the "slow" fault right now (an upload in flight)."""
        return len(self._sleeping)

    @property
    def token_requests(self) -> int:
        """Every POST to the token endpoint, failed ones included (to catch hammering)."""
        return self._token_requests

    @property
    def tokens_issued(self) -> int:
        return self._tokens_issued

    # ------------------------------------------------------------------ HTTP: plumbing
    @web.middleware
    async def _track_busy(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            self._busy.add(transport)
        try:
            response = await handler(request)
        finally:
            if transport is not None:
                self._busy.discard(transport)
        # The sandbox's own clock (time travel included), as a real server's Date would be:
        # the gateway reads it to tell clock skew from bad data.
        response.headers["Date"] = email.utils.formatdate(self.now_ms() / 1000, usegmt=True)
        return response

    # ------------------------------------------------------------------ HTTP: OAuth2
    async def _handle_token(self, request: web.Request) -> web.Response:
        self._token_requests += 1
        try:
            auth = BasicAuth.decode(request.headers.get("Authorization", ""))
        except ValueError:
            auth = None
        if auth is None or (auth.login, auth.password) != (self.client_id, self.client_secret):
            return self._oauth_error(
                "invalid_client", "Client ID is not found or password is wrong."
            )
        params: dict[str, str] = dict(request.query)
        if request.content_type == "application/x-www-form-urlencoded":
            # Standard OAuth2 clients put the grant in the form body rather than the query.
            params.update({k: v for k, v in (await request.post()).items() if isinstance(v, str)})
        grant = params.get("grant_type")
        if grant == "client_credentials":
            return self._issue_token()
        if grant == "refresh_token":
            refresh = params.get("refresh_token", "")
            if refresh not in self._refresh_tokens:
                return self._oauth_error("invalid_grant", "Refresh token is invalid or used.")
            self._refresh_tokens.discard(refresh)  # single use, as documented
            return self._issue_token()
        return self._oauth_error("unsupported_grant_type", f"Grant type {grant!r} not supported.")

    @staticmethod
    def _oauth_error(error: str, description: str) -> web.Response:
        return web.json_response({"error": error, "error_description": description}, status=400)

    def _issue_token(self) -> web.Response:
        access, refresh = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        self._tokens[access] = self.now_ms() + self.token_ttl_s * 1000
        self._refresh_tokens.add(refresh)
        self._tokens_issued += 1
        bad = BAD_TOKENS[self.bad_tokens] if self.bad_tokens is not None else None
        body = {
            "access_token": access if bad is None else bad,
            "token_type": "Bearer",
            "expires_in": self.token_ttl_s,
            "refresh_token": refresh if bad is None else bad,
        }
        return web.json_response(body)

    def _token_valid(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        expiry = self._tokens.get(token.strip())
        if expiry is None:
            return False
        if expiry <= self.now_ms():
            del self._tokens[token.strip()]
            return False
        return True

    # ------------------------------------------------------------------ HTTP: import
    async def _handle_import(self, request: web.Request) -> web.StreamResponse:
        if self._fault.mode == "down":
            # A keep-alive connection that slipped past the close: refuse it like the socket.
            self._abort(request)
            return web.Response(status=500)
        body = await self._read_body(request)
        ids = self._peek(body)
        fault = self._take_fault()
        if fault is not None:
            if fault.mode == "slow":
                task = asyncio.current_task()
                assert task is not None
                self._sleeping.add(task)
                try:
                    await asyncio.sleep(fault.delay_s)
                finally:
                    self._sleeping.discard(task)
            elif fault.mode == "reset":
                self._abort(request)
                self._record(STATUS_RESET, ids, "connection reset (fault)")
                return web.Response(status=500)  # never written: the transport is gone
            else:
                return self._fault_response(fault, ids)
        try:
            self._validate_and_store(request, body, ids)
        except _Reject as rej:
            self._record(rej.status, ids, rej.message)
            headers = None
            if rej.status == 308:
                assert self.redirect_to is not None
                headers = {"Location": self.redirect_to.rstrip("/") + IMPORT_PATH}
            return _error(rej.status, rej.message, headers)
        self._record(204, ids, None)
        return web.Response(status=204)

    @staticmethod
    async def _read_body(request: web.Request) -> bytes | None:
        """The body, or None when it is over the size limit (so nothing is buffered)."""
        if request.content_length is not None and request.content_length > MAX_REQUEST_BYTES:
            return None
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            return None

    @staticmethod
    def _peek(body: bytes | None) -> tuple[int | None, int | None, int]:
        try:
            data = json.loads(body) if body else None
        except ValueError:
            return None, None, 0
        if not isinstance(data, dict):
            return None, None, 0

        def as_int(v: object) -> int | None:
            return v if isinstance(v, int) and not isinstance(v, bool) else None

        values = data.get("values")
        return (
            as_int(data.get("deviceId")),
            as_int(data.get("dataStreamId")),
            len(values) if isinstance(values, list) else 0,
        )

    def _record(
        self, status: int, ids: tuple[int | None, int | None, int], msg: str | None
    ) -> None:
        self._requests.append(
            RequestRecord(status, ids[0], ids[1], ids[2], msg, at_s=time.monotonic())
        )

    @staticmethod
    def _abort(request: web.Request) -> None:
        transport = request.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0 turns the close into a TCP RST, which is what a crashing proxy sends.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    def _fault_response(
        self, fault: _Fault, ids: tuple[int | None, int | None, int]
    ) -> web.Response:
        headers: dict[str, str] = {}
        if fault.mode == "error500":
            status, message = 500, "Internal server error"
        elif fault.mode == "rate_limit":
            status, message = 429, "Too many requests"
            if fault.retry_after_s is not None:
                headers["Retry-After"] = str(math.ceil(fault.retry_after_s))
        else:  # "unauthorized"
            status, message = 401, "Invalid token."
        self._record(status, ids, message)
        return _error(status, message, headers)

    def _validate_and_store(
        self, request: web.Request, body: bytes | None, ids: tuple[int | None, int | None, int]
    ) -> None:
        """The contract's checks in their documented order; raises _Reject on the first miss."""
        if self.redirect_to is not None:
            raise _Reject(308, f"Wrong region. Use {self.redirect_to}")
        if not self._token_valid(request):
            raise _Reject(401, "Invalid token.")
        if body is None:
            raise _Reject(413, "Request is too large.")
        device_id, stream_id, values = self._parse(body)
        streams = self._devices.get(device_id)
        if streams is None:
            raise _Reject(
                404,
                f"Device with identifier {device_id} is not found or belong to another "
                "organization.",
            )
        kind = streams.get(stream_id)
        if kind is None:
            raise _Reject(404, f"Data stream with identifier {stream_id} is not found!")
        for i, item in enumerate(values):
            if not value_fits(kind, item["value"]):
                raise _Reject(
                    400,
                    f"Invalid value {short_repr(item['value'])} at index {i} "
                    f"for data stream {stream_id}.",
                )
        now = self.now_ms()
        oldest = now - self.max_age_days * DAY_MS
        for i, item in enumerate(values):
            ts = item["ts"]
            if ts < oldest:
                raise _Reject(
                    400, f"Timestamp {ts} at index {i} is older than {self.max_age_days} days."
                )
            if ts > now + DAY_MS:
                raise _Reject(400, f"Timestamp {ts} at index {i} is in the future.")
        key = (device_id, self.today())
        if self._quota[key] + len(values) > self.daily_points_limit:
            raise _Reject(
                400,
                f"Device {device_id} has exceeded the daily limit of "
                f"{self.daily_points_limit} points.",
            )
        self._quota[key] += len(values)
        self._accepted.extend(
            AcceptedPoint(device_id, stream_id, item["ts"], item["value"]) for item in values
        )

    @staticmethod
    def _parse(body: bytes) -> tuple[int, int, list[dict[str, Any]]]:
        def bad(detail: str) -> _Reject:
            return _Reject(400, f"Malformed request body: {detail}")

        try:
            data = json.loads(body)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise bad(f"not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise bad("expected a JSON object")
        device_id, stream_id, values = (data.get(k) for k in ("deviceId", "dataStreamId", "values"))
        for name, v in (("deviceId", device_id), ("dataStreamId", stream_id)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise bad(f"'{name}' must be an integer")
        if not isinstance(values, list) or not values:
            raise bad("'values' must be a non-empty list")
        for i, item in enumerate(values):
            if not isinstance(item, dict):
                raise bad(f"values[{i}] must be an object")
            if "value" not in item:
                raise bad(f"values[{i}] has no 'value'")
            ts = item.get("ts")
            if not isinstance(ts, int) or isinstance(ts, bool):
                raise bad(f"values[{i}].ts must be an integer (epoch ms)")
        assert isinstance(device_id, int) and isinstance(stream_id, int)
        return device_id, stream_id, values

    # ------------------------------------------------------------------ HTTP: admin
    async def _admin_state(self, request: web.Request) -> web.Response:
        per_device: Counter[int] = Counter(p.device_id for p in self._accepted)
        refused: Counter[int] = Counter(r.status for r in self._requests if r.status != 204)
        return web.json_response(
            {
                "accepted_total": len(self._accepted),
                "accepted_per_device": {str(k): v for k, v in sorted(per_device.items())},
                "requests_total": len(self._requests),
                "refused": {str(k): v for k, v in sorted(refused.items())},
                "fault": self._fault.mode,
                "fault_remaining": self._fault.remaining,
                "token_requests": self._token_requests,
                "now_ms": self.now_ms(),
            }
        )

    @staticmethod
    async def _admin_json(request: web.Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="body must be JSON") from None
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        return data

    async def _admin_fault(self, request: web.Request) -> web.Response:
        data = await self._admin_json(request)
        try:
            await self.set_fault(
                str(data.get("mode", "none")),
                count=data.get("count"),
                retry_after_s=data.get("retry_after_s"),
                delay_s=float(data.get("delay_s") or 0.0),
            )
        except (ValueError, TypeError) as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        resp = web.json_response({"fault": self._fault.mode})
        if self._fault.mode == "down":
            resp.force_close()  # tell the client not to reuse a connection about to close
        return resp

    async def _admin_clock(self, request: web.Request) -> web.Response:
        data = await self._admin_json(request)
        try:
            if "set_ms" in data:
                self.set_clock(int(data["set_ms"]))
            self.advance_clock(float(data.get("advance_s") or 0.0))
        except (ValueError, TypeError) as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        return web.json_response({"now_ms": self.now_ms()})

    async def _admin_points(self, request: web.Request) -> web.Response:
        wanted = request.query.get("device_id")
        try:
            device = int(wanted) if wanted is not None else None
        except ValueError:
            raise web.HTTPBadRequest(text="device_id must be an integer") from None
        points = [
            {
                "device_id": p.device_id,
                "datastream_id": p.datastream_id,
                "ts": p.ts,
                "value": p.value,
            }
            for p in self._accepted
            if device is None or p.device_id == device
        ]
        return web.json_response(points)

    async def _admin_revoke(self, request: web.Request) -> web.Response:
        self.revoke_tokens()
        return web.json_response({"revoked": True})

    async def _admin_precount(self, request: web.Request) -> web.Response:
        data = await self._admin_json(request)
        try:
            device, n = int(data["device_id"]), int(data["n"])
        except (KeyError, ValueError, TypeError) as exc:
            raise web.HTTPBadRequest(text=f"need integer device_id and n: {exc}") from None
        self.precount(device, n)
        return web.json_response({"used_today": self.quota_used(device)})
