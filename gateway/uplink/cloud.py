"""Blynk Organization API client: OAuth2 token and `import/batch`, failures classified.

Every way a request can fail becomes one exception of `gateway.errors`, so the flush loop
decides what to do from the type alone: retry later, bisect, park, or dead-letter. httpx's
own exceptions never escape this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import math
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import httpx

from gateway import __version__
from gateway.config import MAX_CONCURRENT_REQUESTS
from gateway.errors import (
    AuthFailed,
    BatchRejected,
    CloudError,
    CloudServerError,
    CloudUnreachable,
    ConnectFailed,
    QuotaRefused,
    RateLimited,
    TooOld,
    UnknownTarget,
    WrongRegion,
)
from gateway.log import scrubber
from gateway.models import Batch
from gateway.uplink.budget import RequestBudget

IMPORT_PATH = "/api/v1/organization/device/import/batch"
TOKEN_PATH = "/oauth2/token"
MAX_REQUEST_BYTES = 2_000_000

# The cloud's wording for a refused daily quota is not documented; match it loosely.
_QUOTA_MESSAGE = re.compile(
    r"(exceed|reach|over)\w*\b.{0,40}\b(daily|per[- ]day|a day)\b.{0,20}\blimit"
    r"|\b(daily|per[- ]day)\s+(points?\s+)?limit\b.{0,20}\b(exceeded|reached)",
    re.I,
)
# Nor is its wording for a too-old timestamp ("... is older than 30 days." in the sandbox).
_TOO_OLD_MESSAGE = re.compile(r"older than|too old|too far in the past", re.I)
_REDIRECTS = (301, 302, 307, 308)
# A probe is one TCP connect (plus TLS handshake): it answers in milliseconds when the
# cloud is there, so it needs no more time than this even on a slow uplink.
PROBE_TIMEOUT_S = 10.0
# What a token must look like to be sent as `Authorization: Bearer <token>`: visible ASCII,
# no spaces (RFC 6750's b64token is stricter; this is what HTTP can carry unharmed). A
# token with a newline, a control character or a non-ASCII letter cannot be sent, and its
# text must never reach a log line or `status` through an HTTP library's error message.
_SENDABLE_TOKEN = re.compile(r"[\x21-\x7e]+")
MAX_TOKEN_CHARS = 8192
DEFAULT_TOKEN_LIFETIME_S = 300.0

Endpoint = Literal["token", "import"]


@dataclass
class _Token:
    access_token: str
    renew_at: float


def token_problem(token: object) -> str | None:
    """Why `token` cannot be sent as a Bearer token (never quoting it), or None."""
    if not isinstance(token, str):
        return f"not a string but {type(token).__name__}"
    if not token:
        return "empty"
    if len(token) > MAX_TOKEN_CHARS:
        return f"{len(token)} characters, more than {MAX_TOKEN_CHARS}"
    if not token.isascii():
        return f"not ASCII ({len(token)} characters)"
    if not _SENDABLE_TOKEN.fullmatch(token):
        return f"contains spaces or control characters ({len(token)} characters)"
    return None


def parse_token_answer(response: httpx.Response) -> tuple[str, float]:
    """(access token, lifetime in seconds) from a 200, or a retryable `CloudServerError`.

    The tokens join the log scrubber the moment they are read, whatever else is wrong with
    the answer; the error never quotes them.
    """

    def unusable(problem: str) -> CloudServerError:
        return CloudServerError(f"token endpoint answered 200 with {problem}", status=200)

    try:
        document: Any = response.json()
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise unusable("a body that is not JSON") from None
    if not isinstance(document, dict):
        raise unusable("JSON that is not an object")
    access_token = document.get("access_token")
    scrubber.register_rotating("cloud_access_token", access_token)
    scrubber.register_rotating("cloud_refresh_token", document.get("refresh_token"))
    problem = "no access_token" if access_token is None else token_problem(access_token)
    if problem is not None:
        raise unusable(f"an unusable access_token: {problem}")
    try:
        lifetime_s = token_lifetime_s(document.get("expires_in"))
    except (TypeError, ValueError, OverflowError):  # OverflowError: a 400-digit integer
        raise unusable("an expires_in that is not a number") from None
    assert isinstance(access_token, str)  # token_problem said so
    return access_token, lifetime_s


def token_lifetime_s(expires_in: object) -> float:
    """`expires_in` in seconds; absent, not a finite positive number: a short default."""
    if expires_in is None:
        return DEFAULT_TOKEN_LIFETIME_S
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float | str):
        raise TypeError(f"expires_in is {type(expires_in).__name__}")
    lifetime = float(expires_in)  # ValueError for text that is not a number
    return lifetime if math.isfinite(lifetime) and lifetime > 0 else DEFAULT_TOKEN_LIFETIME_S


def build_body(batch: Batch) -> bytes:
    """The import/batch JSON, spliced from stored JSON texts (no per-value re-encoding)."""
    values = ",".join(f'{{"value":{p.value_json},"ts":{p.ts_ms}}}' for p in batch.points)
    return (
        f'{{"deviceId":{batch.stream.device_id},"dataStreamId":{batch.stream.datastream_id},'
        f'"values":[{values}]}}'
    ).encode()


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), None when absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now())


def error_message(response: httpx.Response) -> str:
    """`{"error": {"message": ...}}` (or the OAuth2 shape) as one readable line."""
    try:
        document: Any = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        text = response.text.strip()
        return text[:200] if text else response.reason_phrase
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if isinstance(error, str):
            description = document.get("error_description")
            return f"{error}: {description}" if description else error
    return json.dumps(document)[:200]


def _cloud_now_ms(date_header: str | None) -> int | None:
    """The cloud's clock from its `Date` header (second resolution), None when absent/bad."""
    if not date_header:
        return None
    try:
        return int(email.utils.parsedate_to_datetime(date_header).timestamp() * 1000)
    except (TypeError, ValueError):
        return None


def _region_message(response: httpx.Response) -> str:
    location = response.headers.get("Location", "")
    host = httpx.URL(location).host if location else "?"
    return (
        f"the organization is served by another region ({host or location}); "
        f"set cloud.server to https://{host} (server answered {response.status_code})"
    )


def classify_failure(response: httpx.Response, endpoint: Endpoint) -> CloudError:
    """The one place that turns a non-2xx answer into a `CloudError`, for both endpoints.

    Retry-After is read for every retryable status of either endpoint; only the meaning of a
    4xx differs: the token endpoint refuses credentials, the import endpoint refuses data.
    """
    status = response.status_code
    message = error_message(response)
    if endpoint == "token":
        message = f"token request refused: {message}"
    retry_after_s = parse_retry_after(response.headers.get("Retry-After"))
    if status in _REDIRECTS:
        return WrongRegion(_region_message(response), location=response.headers.get("Location"))
    if status == 429:
        return RateLimited(message, status=status, retry_after_s=retry_after_s)
    if status >= 500:
        return CloudServerError(f"{status}: {message}", status=status, retry_after_s=retry_after_s)
    if endpoint == "token":
        return AuthFailed(message, status=status)
    if status in (401, 403):
        return AuthFailed(f"{status} after renewing the token: {message}", status=status)
    if status == 404:
        kind = "datastream" if "data stream" in message.lower() else "device"
        return UnknownTarget(message, kind=kind)
    if _QUOTA_MESSAGE.search(message) and not message.lower().startswith("invalid value"):
        return QuotaRefused(message, status=status)
    if _TOO_OLD_MESSAGE.search(message):
        date = response.headers.get("Date")
        return TooOld(message, status=status, cloud_date=date, cloud_now_ms=_cloud_now_ms(date))
    return BatchRejected(message, status=status)


class CloudClient(Protocol):
    """What the flush loop needs from an upload path (Blynk's Organization API today)."""

    server: str

    async def upload(self, batch: Batch) -> None:
        """Deliver one batch or raise a classified `CloudError`."""

    async def probe(self) -> None:
        """Open (and close) a connection to the server, or raise `ConnectFailed`."""


class BlynkCloud:
    """One instance per process; it owns the token and a keep-alive connection pool.

    Several uploads may run at once (`cloud.max_concurrent_requests`, one per stream): the
    pool keeps a connection for each, plus one for a token request, so none waits for a
    connection (httpx would count that wait against the timeout) and none is reopened
    between batches. HTTP/1.1: the sandbox cannot speak HTTP/2, so nothing here measured
    what it would bring (README "Performance"). Every request, tokens included, takes a
    slot of the request `budget` first.
    """

    def __init__(
        self,
        server: str,
        client_id: str,
        client_secret: str,
        *,
        timeout_s: float = 15.0,
        transport: httpx.AsyncBaseTransport | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        budget: RequestBudget | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        self._credentials = (client_id, client_secret)
        self._auth = httpx.BasicAuth(client_id, client_secret)
        self._monotonic = monotonic
        self._token: _Token | None = None
        # Concurrent uploads that find no token wait for one request, not one each.
        self._token_lock = asyncio.Lock()
        self._timeout_s = timeout_s
        self._ssl_context: ssl.SSLContext | None = None
        self.token_renewals = 0
        self.budget = budget
        connections = MAX_CONCURRENT_REQUESTS + 1
        self._http = httpx.AsyncClient(
            base_url=self.server,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            follow_redirects=False,
            transport=transport,
            headers={"User-Agent": f"blynk-edge-gateway/{__version__}"},
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def forget_token(self, token: str | None = None) -> None:
        """Drop the cached token; with `token`, only if it is still that one (another upload
        may have renewed it since this one was refused)."""
        if token is None or (self._token is not None and self._token.access_token == token):
            self._token = None

    def set_credentials(self, client_id: str, client_secret: str) -> None:
        """New OAuth client credentials (a reload): the next request fetches a new token.

        The same credentials again (a reload that changed something else) keep the token:
        dropping it would cost a token request per reload for nothing.
        """
        if (client_id, client_secret) == self._credentials:
            return
        self._credentials = (client_id, client_secret)
        self._auth = httpx.BasicAuth(client_id, client_secret)
        self._token = None

    async def _send(self, request: httpx.Request, auth: httpx.Auth | None = None) -> httpx.Response:
        if self.budget is None:
            return await self._send_now(request, auth)
        async with self.budget.slot():
            return await self._send_now(request, auth)

    async def _send_now(
        self, request: httpx.Request, auth: httpx.Auth | None = None
    ) -> httpx.Response:
        try:
            if auth is None:
                return await self._http.send(request)
            return await self._http.send(request, auth=auth)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # DNS, refused, unreachable, TLS handshake: the request never left.
            raise ConnectFailed(
                f"cannot connect to {self.server}: {type(exc).__name__}: {exc}"
            ) from exc
        except httpx.TimeoutException as exc:
            raise CloudUnreachable(
                f"timeout talking to {self.server}: {type(exc).__name__}"
            ) from exc
        except httpx.TransportError as exc:
            raise CloudUnreachable(
                f"connection to {self.server} broke: {type(exc).__name__}: {exc}"
            ) from exc
        except httpx.HTTPError as exc:  # e.g. a body that does not match its Content-Encoding
            raise CloudServerError(f"unreadable answer from {self.server}: {exc}") from exc

    async def probe(self) -> None:
        """TCP connect, plus the TLS handshake for https: no HTTP request, no token.

        Cheap enough to run every few seconds while the cloud cannot be reached, so the
        gateway resumes within seconds of the uplink coming back instead of sleeping out a
        long backoff.
        """
        url = httpx.URL(self.server)
        https = url.scheme == "https"
        port = url.port or (443 if https else 80)
        context = None
        if https:
            if self._ssl_context is None:
                self._ssl_context = httpx.create_ssl_context()
            context = self._ssl_context
        try:
            async with asyncio.timeout(min(self._timeout_s, PROBE_TIMEOUT_S)):
                _, writer = await asyncio.open_connection(
                    url.host, port, ssl=context, server_hostname=url.host if https else None
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise ConnectFailed(
                f"cannot connect to {self.server}: {type(exc).__name__}: {exc}"
            ) from exc
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):  # connected: all a probe asks
            await writer.wait_closed()

    async def prepare(self, timeout_s: float = 5.0) -> None:
        """Fetch a token before the first upload needs one: a backlog waiting at start goes
        up a round trip sooner. Never raises: the first upload meets whatever is wrong."""
        with contextlib.suppress(CloudError, TimeoutError):
            async with asyncio.timeout(min(timeout_s, self._timeout_s)):
                await self.access_token()

    async def access_token(self) -> str:
        """A cached token, renewed ahead of `expires_in` so no upload meets an expired one."""
        if self._token is not None and self._monotonic() < self._token.renew_at:
            return self._token.access_token
        async with self._token_lock:
            if self._token is not None and self._monotonic() < self._token.renew_at:
                return self._token.access_token  # renewed while this one waited
            return await self._renew_token()

    async def _renew_token(self) -> str:
        request = self._http.build_request(
            "POST", TOKEN_PATH, params={"grant_type": "client_credentials"}
        )
        response = await self._send(request, auth=self._auth)
        if response.status_code != 200:
            raise classify_failure(response, "token")
        access_token, expires_in = parse_token_answer(response)
        margin = min(300.0, expires_in * 0.1)
        self._token = _Token(access_token, self._monotonic() + max(1.0, expires_in - margin))
        self.token_renewals += 1
        return access_token

    async def upload(self, batch: Batch) -> None:
        """Send one batch; returns on 204, raises a classified `CloudError` otherwise."""
        body = build_body(batch)
        if len(body) > MAX_REQUEST_BYTES:
            raise BatchRejected(f"request of {len(body)} bytes exceeds the 2 MB limit", status=413)
        for attempt in (1, 2):
            token = await self.access_token()
            request = self._http.build_request(
                "POST",
                IMPORT_PATH,
                content=body,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            response = await self._send(request)
            status = response.status_code
            if 200 <= status < 300:
                return
            if status in (401, 403):
                self.forget_token(token)
                if attempt == 1:
                    continue
            raise classify_failure(response, "import")
