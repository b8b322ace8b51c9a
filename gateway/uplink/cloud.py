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
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import httpx

from gateway import __version__
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
from gateway.models import Batch

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

Endpoint = Literal["token", "import"]


@dataclass
class _Token:
    access_token: str
    renew_at: float


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
    """One instance per process; it owns the token and a keep-alive connection pool."""

    def __init__(
        self,
        server: str,
        client_id: str,
        client_secret: str,
        *,
        timeout_s: float = 15.0,
        transport: httpx.AsyncBaseTransport | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server = server.rstrip("/")
        self._auth = httpx.BasicAuth(client_id, client_secret)
        self._monotonic = monotonic
        self._token: _Token | None = None
        self._timeout_s = timeout_s
        self._ssl_context: ssl.SSLContext | None = None
        self.token_renewals = 0
        self._http = httpx.AsyncClient(
            base_url=self.server,
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,
            transport=transport,
            headers={"User-Agent": f"blynk-edge-gateway/{__version__}"},
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def forget_token(self) -> None:
        self._token = None

    def set_credentials(self, client_id: str, client_secret: str) -> None:
        """New OAuth client credentials (a reload): the next request fetches a new token."""
        self._auth = httpx.BasicAuth(client_id, client_secret)
        self._token = None

    async def _send(self, request: httpx.Request, auth: httpx.Auth | None = None) -> httpx.Response:
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

    async def access_token(self) -> str:
        """A cached token, renewed ahead of `expires_in` so no upload meets an expired one."""
        if self._token is not None and self._monotonic() < self._token.renew_at:
            return self._token.access_token
        request = self._http.build_request(
            "POST", TOKEN_PATH, params={"grant_type": "client_credentials"}
        )
        response = await self._send(request, auth=self._auth)
        if response.status_code != 200:
            raise classify_failure(response, "token")
        try:
            document = response.json()
            access_token = str(document["access_token"])
            expires_in = float(document.get("expires_in", 300))
        except (ValueError, KeyError, TypeError) as exc:
            raise CloudServerError(
                f"token endpoint answered 200 without a usable token: {exc}", status=200
            ) from exc
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
                self.forget_token()
                if attempt == 1:
                    continue
            raise classify_failure(response, "import")
