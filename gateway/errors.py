"""One exception tree for the whole gateway.

```
GatewayError
├── ConfigError                  startup stops; message names the key and the value
├── PayloadError                 one MQTT message cannot become a reading (`code` is stable)
├── UnstorableValue              a reading holds a value SQLite cannot bind (an id beyond
│                                64 bits): nothing was written; ingest isolates it
├── StoreError                   the buffer cannot take more right now (read-only, I/O error)
│   ├── BufferFull               `backpressure` policy at its limit: hold the MQTT acks
│   ├── DiskFull                 the filesystem is full: hold the acks until uploads free room
│   └── StoreCorrupt             the file is damaged; the owner salvages it and carries on
└── CloudError
    ├── RetryableCloudError      keep the data, back off, try again (retry_after_s honoured)
    │   ├── CloudUnreachable     the exchange broke after the request was sent (read timeout)
    │   │   └── ConnectFailed    no connection at all (DNS, refused, unreachable, TLS):
    │   │                        probe cheaply and resume as soon as a connect succeeds
    │   ├── CloudServerError     5xx
    │   ├── RateLimited          429
    │   └── AuthFailed           token refused, or 401/403 after one renewal
    └── PermanentCloudError      this request will never succeed as it is
        ├── WrongRegion          308: the account lives on another server
        ├── UnknownTarget        404: device or datastream does not exist
        ├── QuotaRefused         the cloud says the device's daily limit is used up
        └── BatchRejected        other 4xx: some points are bad -> bisect, dead-letter those
            └── TooOld           refused for age although our clock says they are fine:
                                 dead-letter what the cloud's clock implies, never bisect
```
Third-party exceptions (httpx, sqlite3) are wrapped at the module edge with `raise ... from`.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is unusable; the message is meant for the operator as-is."""


class PayloadError(GatewayError, ValueError):
    """A message that cannot become a valid point.

    `code` is a short stable name (`not_a_number`, `ts_not_ms`, ...) used for log throttling,
    counters and the dead-letter reason; `detail` carries the offending value, which varies
    per message and so must never be used as a key.
    """

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


class UnstorableValue(GatewayError):
    """An append failed on a value SQLite cannot hold (OverflowError, unencodable text, an
    unsupported type) before anything was written: not the disk's fault, so the caller
    sets the offending readings aside instead of holding every acknowledgement."""


class StoreError(GatewayError):
    """The buffer cannot accept writes (disk full, read-only filesystem, I/O error)."""


class BufferFull(StoreError):
    """The `backpressure` policy refuses a commit: hold the MQTT acks until space is freed."""

    def __init__(self, message: str, *, buffered: int, limit: int) -> None:
        super().__init__(message)
        self.buffered = buffered
        self.limit = limit


class DiskFull(StoreError):
    """SQLITE_FULL or ENOSPC: appends wait for uploads (or the operator) to free space."""


class StoreCorrupt(StoreError):
    """The database file is damaged (SQLITE_CORRUPT / SQLITE_NOTADB)."""


class CloudError(GatewayError):
    """Any failed exchange with the Blynk cloud."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class RetryableCloudError(CloudError):
    """Nothing is wrong with the data: wait and send the same batch again."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after_s = retry_after_s


class CloudUnreachable(RetryableCloudError):
    """Network error or timeout: the cloud may or may not have seen the request."""


class ConnectFailed(CloudUnreachable):
    """Not even a connection: the request never left, so a cheap TCP probe tells when to retry."""


class CloudServerError(RetryableCloudError):
    """5xx from the cloud."""


class RateLimited(RetryableCloudError):
    """429: too many requests for the organization."""


class AuthFailed(RetryableCloudError):
    """Credentials refused; retried slowly because an operator may fix them in the console."""


class PermanentCloudError(CloudError):
    """Sending the same request again cannot succeed."""


class WrongRegion(PermanentCloudError):
    """308: the organization lives on another regional server (`location`)."""

    def __init__(self, message: str, *, location: str | None) -> None:
        super().__init__(message, status=308)
        self.location = location


class UnknownTarget(PermanentCloudError):
    """404: the device or the datastream is unknown to the cloud (`kind` says which)."""

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message, status=404)
        self.kind = kind


class QuotaRefused(PermanentCloudError):
    """The cloud counts the device's daily point limit as used up (possibly by other uploads)."""


class BatchRejected(PermanentCloudError):
    """4xx about the request's content: some points are unacceptable."""


class TooOld(BatchRejected):
    """The cloud refused points for their age; `cloud_now_ms` is its `Date` header, if any."""

    def __init__(
        self, message: str, *, status: int, cloud_date: str | None, cloud_now_ms: int | None
    ) -> None:
        super().__init__(message, status=status)
        self.cloud_date = cloud_date
        self.cloud_now_ms = cloud_now_ms
