"""Blynk Organization API client: OAuth2 token and `import/batch`, failures classified.

Every way a request can fail becomes one exception of `gateway.errors`, so the flush loop
decides what to do from the type alone: retry later, bisect, park, or dead-letter. httpx's
own exceptions never escape this module.
"""

from __future__ import annotations

import email.utils
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from gateway import __version__
from gateway.errors import (
    AuthFailed,
    BatchRejected,
    CloudServerError,
    CloudUnreachable,
    QuotaRefused,
    RateLimited,
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

    async def _send(self, request: httpx.Request, auth: httpx.Auth | None = None) -> httpx.Response:
        try:
            if auth is None:
                return await self._http.send(request)
            return await self._http.send(request, auth=auth)
        except httpx.TimeoutException as exc:
            raise CloudUnreachable(
                f"timeout talking to {self.server}: {type(exc).__name__}"
            ) from exc
        except httpx.TransportError as exc:
            raise CloudUnreachable(
                f"cannot reach {self.server}: {type(exc).__name__}: {exc}"
            ) from exc
        except httpx.HTTPError as exc:  # e.g. a body that does not match its Content-Encoding
            raise CloudServerError(f"unreadable answer from {self.server}: {exc}") from exc

    async def access_token(self) -> str:
        """A cached token, renewed ahead of `expires_in` so no upload meets an expired one."""
        if self._token is not None and self._monotonic() < self._token.renew_at:
            return self._token.access_token
        request = self._http.build_request(
            "POST", TOKEN_PATH, params={"grant_type": "client_credentials"}
        )
        response = await self._send(request, auth=self._auth)
        if response.status_code != 200:
            self._raise_for_token(response)
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

    def _raise_for_token(self, response: httpx.Response) -> None:
        status = response.status_code
        message = f"token request refused: {error_message(response)}"
        if status == 429:
            raise RateLimited(
                message,
                status=status,
                retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
            )
        if status >= 500:
            raise CloudServerError(message, status=status)
        if status in (301, 302, 307, 308):
            raise WrongRegion(
                self._region_message(response), location=response.headers.get("Location")
            )
        raise AuthFailed(message, status=status)

    def _region_message(self, response: httpx.Response) -> str:
        location = response.headers.get("Location", "")
        host = httpx.URL(location).host if location else "?"
        return (
            f"the organization is served by another region ({host or location}); "
            f"set cloud.server to https://{host} (server answered {response.status_code})"
        )

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
            if status in (401, 403) and attempt == 1:
                self.forget_token()
                continue
            self._raise_for_upload(response, batch)

    def _raise_for_upload(self, response: httpx.Response, batch: Batch) -> None:
        status = response.status_code
        message = error_message(response)
        if status in (401, 403):
            self.forget_token()
            raise AuthFailed(f"{status} after renewing the token: {message}", status=status)
        if status in (301, 302, 307, 308):
            raise WrongRegion(
                self._region_message(response), location=response.headers.get("Location")
            )
        if status == 429:
            raise RateLimited(
                message,
                status=status,
                retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
            )
        if status >= 500:
            raise CloudServerError(
                f"{status}: {message}",
                status=status,
                retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
            )
        if status == 404:
            kind = "datastream" if "data stream" in message.lower() else "device"
            raise UnknownTarget(message, kind=kind)
        if _QUOTA_MESSAGE.search(message) and not message.lower().startswith("invalid value"):
            raise QuotaRefused(message, status=status)
        raise BatchRejected(message, status=status)
