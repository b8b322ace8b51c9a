"""Settings: a TOML file, then environment overrides (`BLYNK_GATEWAY_SECTION__KEY`).

Everything is validated before the daemon starts. Unknown keys are errors because a typo in
a key (`comit_interval_ms`) would otherwise silently keep a default the operator meant to
change. Errors name the offending key and value; secret values are never echoed.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from datetime import UTC, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from gateway.clock import ClockSettings
from gateway.config.base import PositiveFloat, Section, require_order

# Re-exported: `[mqtt]` lives in config/mqtt.py, and callers import it from here.
from gateway.config.mqtt import MQTT_KEY_CREDENTIAL as MQTT_KEY_CREDENTIAL
from gateway.config.mqtt import MqttSettings as MqttSettings
from gateway.config.mqtt import TlsSetupError as TlsSetupError
from gateway.errors import ConfigError
from gateway.models import MAX_BLYNK_ID
from gateway.sampling import DEFAULT_DAILY_LIMIT, SampleSpec, fit_problem, spec_problem

# The unit's `LoadCredential=client_secret:...`: $CREDENTIALS_DIRECTORY/client_secret.
CLIENT_SECRET_CREDENTIAL = "client_secret"

ENV_PREFIX = "BLYNK_GATEWAY_"
ENV_NESTED_DELIMITER = "__"


# The HTTP client keeps this many connections (plus one for a token request) whatever the
# setting, so a reload can raise `cloud.max_concurrent_requests` up to it.
MAX_CONCURRENT_REQUESTS = 16


class CloudSettings(Section):
    server: str = "https://fra1.blynk.cloud"
    client_id: str = Field(min_length=1)
    client_secret: SecretStr
    timeout_s: PositiveFloat = 15.0
    daily_points_limit: Annotated[int, Field(ge=1, le=10_000_000)] = DEFAULT_DAILY_LIMIT
    max_age_days: Annotated[float, Field(gt=0, le=3650)] = 30.0
    # Readings this close to the age limit are not sent: clocks and queues differ.
    age_margin_hours: Annotated[float, Field(ge=0, le=240)] = 6.0
    day_timezone: str = "UTC"
    # Upload requests in flight at once, each for a different stream (order within a stream
    # is kept): a cloud 100 ms away then takes that many batches per round trip, not one.
    # After a backlog, each stream still needs its last request: ceil(streams / this) round
    # trips. 8, not 4: with 20 streams at 100 ms that tail is 0.3 s instead of 0.5 s, and
    # the backlog drain 0.59x bare paho instead of 0.49x (benchmarks/README.md). The
    # request rate is the budget's to bound, not this.
    max_concurrent_requests: Annotated[int, Field(ge=1, le=MAX_CONCURRENT_REQUESTS)] = 8
    # Blynk answers 429 above 10,000 requests a minute per organization, and every gateway
    # of the fleet shares that: this gateway's cap, never exceeded (token requests and
    # retries included; uplink/budget.py). When it binds, batches grow instead.
    max_requests_per_minute: Annotated[int, Field(ge=1, le=10_000)] = 1000

    def oldest_sendable_ms(self, now_ms: int) -> int:
        """Readings older than this are refused by the cloud, less a margin for clock drift."""
        max_age_ms = self.max_age_days * 86_400_000 - self.age_margin_hours * 3_600_000
        return now_ms - int(max_age_ms)

    @field_validator("server")
    @classmethod
    def _server_is_http_url(cls, server: str) -> str:
        if not server.startswith(("https://", "http://")) or len(server.split("://", 1)[1]) == 0:
            raise ValueError(
                f"must start with https:// (or http:// for a local sandbox): {server!r}"
            )
        return server.rstrip("/")

    @field_validator("day_timezone")
    @classmethod
    def _known_timezone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {name!r}") from exc
        return name


class StoreSettings(Section):
    path: Path = Path("/var/lib/blynk-gateway/buffer.db")
    # FULL: a reading acknowledged to the broker survives a power cut. NORMAL is faster but
    # may lose the last transactions on power loss (never on a process crash).
    synchronous: Literal["NORMAL", "FULL", "EXTRA"] = "FULL"
    # Group commit: readings wait at most this long for company before one fsync covers them.
    commit_interval_ms: Annotated[int, Field(ge=1, le=10_000)] = 200
    # Commit early when this many readings wait (0 = derive from mqtt.inflight_window).
    commit_max_readings: Annotated[int, Field(ge=0, le=100_000)] = 0
    # Capacity. A buffered reading takes about 21 bytes of file (measured, see README "Data
    # safety"), so 20 million readings are about 0.43 GB, well inside max_bytes; 2 GiB leaves
    # most of a 16 GB card to the system and its logs.
    max_points: Annotated[int, Field(ge=1, le=1_000_000_000)] = 20_000_000
    max_bytes: Annotated[int, Field(ge=1_048_576)] = 2 * 1024**3
    # What happens at the limit: drop-oldest (evict the oldest readings, counted and logged),
    # drop-newest (acknowledge but do not store new readings, counted and logged), or
    # backpressure (stop acknowledging MQTT: the broker queues for us until uploads free room).
    full_policy: Literal["drop-oldest", "drop-newest", "backpressure"] = "drop-oldest"
    # Readings the cloud refused, kept for inspection; the oldest are pruned beyond this.
    max_dead_letters: Annotated[int, Field(ge=1, le=100_000_000)] = 100_000
    # Space kept allocated next to the buffer and released when the disk fills up, so that
    # uploads can still delete what they delivered (WAL mode needs room even to delete).
    disk_reserve_bytes: Annotated[int, Field(ge=0, le=1024**3)] = 8 * 1024**2
    # SQLite page size of a new buffer file (an existing file keeps its own). Small pages
    # mean fewer bytes written per commit (SD wear); values over ~200 bytes then overflow.
    page_size: Literal[512, 1024, 2048, 4096, 8192, 16384, 32768, 65536] = 1024


class FlushSettings(Section):
    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 1000
    interval_s: PositiveFloat = 5.0
    # After new readings arrive, wait this long for more before uploading a partial batch:
    # one request and one delete transaction per few seconds instead of one per commit.
    linger_s: Annotated[float, Field(ge=0, le=300)] = 2.0
    order: Literal["oldest", "newest"] = "oldest"
    # After the cloud answered badly (5xx, 429, a timeout once the request was sent): capped
    # exponential backoff with full jitter. One gateway's requests are small and few, so a
    # 30 s cap costs the cloud nothing and resumes the upload within 30 s of a fix.
    backoff_min_s: PositiveFloat = 1.0
    backoff_max_s: PositiveFloat = 30.0
    # When the cloud cannot be reached at all (DNS, refused, unreachable, TLS): a TCP connect
    # (and TLS handshake) every this many seconds, jittered; the first that succeeds ends
    # the wait, so uploads resume within seconds of the uplink coming back.
    probe_interval_s: Annotated[float, Field(gt=0, le=300)] = 5.0
    auth_retry_s: PositiveFloat = 300.0
    parked_retry_s: PositiveFloat = 600.0
    # Streams the cloud has accepted before are served first; the others (new ones, and
    # parked ones due for a retry) are tried at most this many per minute, a minute's worth
    # at once. A try the cloud accepts costs nothing, so real new devices are not held
    # back; only refusals (404) use it up. Thousands of wrong ids then cost 10 requests a
    # minute instead of a burst that delays every device.
    new_stream_tries_per_min: Annotated[int, Field(ge=1, le=100_000)] = 10
    shutdown_flush_s: Annotated[float, Field(ge=0, le=600)] = 10.0
    # Pass-through: while the cloud is reachable and nothing is buffered, upload a group of
    # readings first and PUBACK what the cloud accepted without writing it (the broker keeps
    # every reading until its PUBACK, so a crash loses nothing); what is not accepted within
    # pass_through_wait_s is written as usual. false: every reading is written first.
    pass_through: bool = True
    pass_through_wait_s: Annotated[float, Field(gt=0, le=60)] = 2.0

    @model_validator(mode="after")
    def _backoff_order(self) -> FlushSettings:
        require_order(self, "backoff_min_s", "backoff_max_s")
        return self


class LogSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console", "logfmt"] = "auto"


class MetricsSettings(Section):
    """Prometheus metrics (gateway/ops/metrics.py): off unless one of the two is set."""

    # host:port serving /metrics, e.g. "127.0.0.1:9108" or "[::1]:9108" (port 0: any free one).
    listen: str | None = None
    # node_exporter's textfile collector: rewritten atomically every textfile_interval_s.
    # Each write wears an SD card: prefer a tmpfs directory, or a long interval.
    textfile: Path | None = None
    textfile_interval_s: Annotated[float, Field(ge=1, le=3600)] = 60.0

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, listen: str | None) -> str | None:
        if listen is None:
            return None
        host, _, port = listen.rpartition(":")
        if not host.strip("[]") or not port.isdigit() or int(port) > 65535:
            raise ValueError("must be host:port, e.g. 127.0.0.1:9108")
        return listen


DatastreamType = Literal["double", "integer", "enum", "string", "boolean", "location"]
# 0 stays valid: `routes suggest` writes it as the placeholder to replace.
BlynkId = Annotated[int, Field(ge=0, le=MAX_BLYNK_ID)]
# One topic level captured by a route template, e.g. `zigbee2mqtt/{device}`.
TEMPLATE_LEVELS = ("{device}", "{stream}")


class FieldSettings(Section):
    """A payload field (or a `{stream}` name) and the datastream it feeds."""

    datastream: BlynkId
    # The datastream's type in Blynk, if known: values that do not fit are dead-lettered at
    # ingest with a reason instead of being silently ignored or cropped by the cloud.
    type: DatastreamType | None = None
    # How this datastream's readings are thinned (gateway/sampling.py); overrides the route's.
    sample: SampleSpec | None = None


def _as_field(entry: int | FieldSettings) -> FieldSettings:
    return entry if isinstance(entry, FieldSettings) else FieldSettings(datastream=entry)


class RouteSettings(Section):
    """One `[[routes]]` entry: which messages, which device, which datastreams, which time.

    The device comes from `device_id`, a `{device}` topic level or `device_field` (names
    are looked up in `[devices]`); the datastream from `datastream_id`, a `{stream}` level
    looked up in `streams`, or `fields` (payload paths). Every combination is checked here,
    so a route that could never produce a reading stops start-up with its key named.
    """

    topic: str = Field(min_length=1)
    device_id: BlynkId | None = None
    datastream_id: BlynkId | None = None
    type: DatastreamType | None = None
    # JSON path in the payload (dots between keys, digits index lists) -> datastream
    fields: dict[str, BlynkId | FieldSettings] | None = None
    # `{stream}` topic level -> datastream
    streams: dict[str, BlynkId | FieldSettings] | None = None
    # JSON path of the device name in the payload (Shelly Gen2 `src`, OpenMQTTGateway `id`)
    device_field: str | None = Field(default=None, min_length=1)
    # JSON path of the reading's time; absent from a message -> the time it was received
    timestamp: str | None = Field(default=None, min_length=1)
    # For timestamps without an offset: an IANA zone or a fixed offset like "+01:00";
    # None -> the host's local time.
    timezone: str | None = None
    format: Literal["auto", "senml", "array"] = "auto"
    # Retained messages (the broker's replay of the last value on subscribe) carry no
    # time of their own: skip their readings unless the payload dates them.
    retained: Literal["skip", "accept"] = "skip"
    # Payload timestamps further ahead than this, or before 2020, are not trusted.
    max_future_s: Annotated[float, Field(ge=0, le=31 * 86_400)] = 300.0
    bad_timestamp: Literal["replace", "reject"] = "replace"
    # How readings are thinned before they are sent (gateway/sampling.py): windows, a
    # deadband or "fit"; the default for every datastream of the route.
    sample: SampleSpec | None = None

    @field_validator("topic")
    @classmethod
    def _valid_filter(cls, topic: str) -> str:
        levels = topic.split("/")
        for index, level in enumerate(levels):
            if "#" in level and (level != "#" or index != len(levels) - 1):
                raise ValueError(f"'#' must be a whole last level: {topic!r}")
            if "+" in level and level != "+":
                raise ValueError(f"'+' must be a whole level: {topic!r}")
            if ("{" in level or "}" in level) and level not in TEMPLATE_LEVELS:
                raise ValueError(
                    f"{level!r}: a template must be a whole level, {{device}} or {{stream}}: "
                    f"{topic!r}"
                )
            if level in TEMPLATE_LEVELS and levels.count(level) > 1:
                raise ValueError(f"{level} appears more than once: {topic!r}")
        return topic

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, zone: str | None) -> str | None:
        if zone is not None:
            parse_timezone(zone)
        return zone

    @model_validator(mode="after")
    def _one_device_and_datastream_source(self) -> RouteSettings:
        levels = self.topic.split("/")
        device_sources = [
            name
            for name, present in (
                ("device_id", self.device_id is not None),
                ("{device} in topic", "{device}" in levels),
                ("device_field", self.device_field is not None),
            )
            if present
        ]
        if len(device_sources) != 1:
            found = " and ".join(device_sources) if device_sources else "none"
            raise ValueError(
                "a route needs exactly one device source: device_id, a {device} topic level "
                f"or device_field (found {found})"
            )
        has_stream_level = "{stream}" in levels
        if self.streams is not None and not has_stream_level:
            raise ValueError("streams needs a {stream} level in topic")
        stream_sources = [
            name
            for name, present in (
                ("datastream_id", self.datastream_id is not None),
                ("{stream} in topic", has_stream_level),
                ("fields", self.fields is not None),
            )
            if present
        ]
        if len(stream_sources) != 1:
            found = " and ".join(stream_sources) if stream_sources else "none"
            raise ValueError(
                "a route needs exactly one datastream source: datastream_id, a {stream} topic "
                f"level with streams, or fields (found {found})"
            )
        if self.fields is not None and not self.fields:
            raise ValueError("fields is empty: list at least one payload field")
        if self.type is not None and self.datastream_id is None:
            raise ValueError("type applies to datastream_id; give each field its own type")
        if self.format == "senml" and self.fields is None:
            raise ValueError('format = "senml" needs fields (SenML names -> datastreams)')
        if self.format == "senml" and self.timestamp is not None:
            raise ValueError('format = "senml" takes its time from bt + t; drop timestamp')
        self._samples_fit_types()
        return self

    def _samples_fit_types(self) -> None:
        """A numeric aggregate or a deadband on a datastream declared non-numeric: the
        message names the key that says so."""
        for kind, entries in (("fields", self.field_map()), ("streams", self.stream_map())):
            for name, entry in entries.items():
                spec, key = entry.sample, f"{kind}.{name}.sample"
                if spec is None:
                    spec, key = self.sample, f"sample (the route's, for {kind}.{name})"
                problem = spec_problem(spec, entry.type) if spec is not None else None
                if problem is not None:
                    raise ValueError(f"{key}: {problem}")
        if self.sample is not None and self.datastream_id is not None:
            problem = spec_problem(self.sample, self.type)
            if problem is not None:
                raise ValueError(f"sample: {problem}")

    def field_map(self) -> dict[str, FieldSettings]:
        return {path: _as_field(entry) for path, entry in (self.fields or {}).items()}

    def stream_map(self) -> dict[str, FieldSettings]:
        return {name: _as_field(entry) for name, entry in (self.streams or {}).items()}

    def catch_all_problem(self) -> str | None:
        """Why this route's topic takes in far more than it can mean, or None.

        A filter of wildcards only, ending in `#` (`#`, `+/#`, `{device}/#`), is every topic
        on the broker: every other application's messages and, on each subscribe, every
        retained one (discovery configs, states, LWTs), each parsed and counted as unmapped
        or rejected, and on a `{device}` route any first level becomes a device name. It is
        valid MQTT and may be meant on a dedicated broker: a warning, never an error.
        """
        *head, last = self.topic.split("/")
        if last != "#" or any(level != "+" and level not in TEMPLATE_LEVELS for level in head):
            return None
        return (
            "subscribes to every topic on the broker: it takes in every other application's "
            "messages and retained values; give it a first level of its own, e.g. "
            '"sensors/#" or "zigbee2mqtt/{device}"'
        )


def parse_timezone(zone: str) -> tzinfo:
    """An IANA name (`Europe/Berlin`) or a fixed offset (`+01:00`, `-0530`, `Z`)."""
    text = zone.strip()
    if text in ("Z", "UTC", "utc"):
        return UTC
    if text[:1] in ("+", "-"):
        digits = text[1:].replace(":", "")
        if len(digits) in (2, 4) and digits.isdigit():
            hours, minutes = int(digits[:2]), int(digits[2:] or 0)
            if hours <= 23 and minutes <= 59:
                sign = 1 if text[0] == "+" else -1
                return timezone(sign * timedelta(hours=hours, minutes=minutes))
        raise ValueError(f"not a UTC offset like +01:00: {zone!r}")
    try:
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown timezone {zone!r} (an IANA name or +HH:MM)") from exc


DeviceName = Annotated[str, Field(min_length=1)]
# The `[devices]` entry that says what an unlisted name means. `+` is MQTT's one-level
# wildcard, which a topic level can never be, so it can never clash with a device's name.
UNLISTED_DEVICES_KEY = "+"
# "numeric-id": an unlisted name of digits only is the Blynk device id itself;
# "unmapped" (the default): it is refused as `device_unmapped`, like any unlisted name.
UNLISTED_DEVICE_POLICIES = ("unmapped", "numeric-id")


class DeviceNames(dict[str, int]):
    """`[devices]` as configured: name -> Blynk device id, and whether an unlisted name of
    digits only is taken as the id itself (`"+" = "numeric-id"`, off by default: a stray
    publisher inventing numbers would otherwise invent devices for the cloud to refuse)."""

    def __init__(self, names: dict[str, int] | None = None, *, numeric_ids: bool = False):
        super().__init__(names or {})
        self.numeric_ids = numeric_ids

    def __repr__(self) -> str:
        return f"DeviceNames({dict(self)!r}, numeric_ids={self.numeric_ids})"


def _device_names(raw: Any, handler: ValidatorFunctionWrapHandler) -> DeviceNames:
    """Take the `"+"` entry out of `[devices]`, validate it and the names separately."""
    policy = "unmapped"
    if isinstance(raw, DeviceNames):
        return raw
    if isinstance(raw, dict) and UNLISTED_DEVICES_KEY in raw:
        raw = dict(raw)
        policy = raw.pop(UNLISTED_DEVICES_KEY)
        if policy not in UNLISTED_DEVICE_POLICIES:
            allowed = " or ".join(f'"{choice}"' for choice in UNLISTED_DEVICE_POLICIES)
            raise PydanticCustomError(
                "unlisted_devices",
                f'"{UNLISTED_DEVICES_KEY}" (what an unlisted name means) must be {allowed}, '
                "got {got}",
                {"got": repr(policy)[:40]},
            )
    return DeviceNames(handler(raw), numeric_ids=policy == "numeric-id")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
        frozen=True,
    )

    mqtt: MqttSettings = MqttSettings()
    cloud: CloudSettings
    store: StoreSettings = StoreSettings()
    flush: FlushSettings = FlushSettings()
    log: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()
    clock: ClockSettings = ClockSettings()  # defined with the clock (gateway/clock.py)
    # Names seen in topics ({device}) or payloads (device_field) -> Blynk device ids, and
    # `"+"`: what an unlisted name means (see DeviceNames).
    devices: dict[DeviceName, BlynkId] = Field(default_factory=DeviceNames)
    routes: Annotated[list[RouteSettings], Field(min_length=1)]

    @field_validator("devices", mode="wrap")
    @classmethod
    def _unlisted_devices(cls, raw: Any, handler: ValidatorFunctionWrapHandler) -> DeviceNames:
        return _device_names(raw, handler)

    @model_validator(mode="after")
    def _fit_can_be_planned(self) -> Settings:
        """`sample = "fit"` needs every device's datastreams counted, and a window that fits."""
        numeric_ids = isinstance(self.devices, DeviceNames) and self.devices.numeric_ids
        problem = fit_problem(
            self.routes,
            self.devices.values(),
            numeric_ids=numeric_ids,
            limit=self.cloud.daily_points_limit,
        )
        if problem is not None:
            raise ValueError(f"routes: {problem}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's content arrives as init kwargs; the environment must win over it.
        return (env_settings, init_settings)

    def commit_max_readings(self) -> int:
        """Commit before the broker's in-flight window fills, or ingest stalls on it."""
        if self.store.commit_max_readings:
            return self.store.commit_max_readings
        return max(1, math.floor(self.mqtt.inflight_window * 0.8))

    def secret_values(self) -> list[str]:
        """Literal secrets, handed to the log scrubber."""
        values = [self.cloud.client_secret.get_secret_value()]
        if self.mqtt.password is not None:
            values.append(self.mqtt.password.get_secret_value())
        return values


def _is_secret_location(location: tuple[Any, ...]) -> bool:
    return any(
        isinstance(part, str) and ("secret" in part or "password" in part) for part in location
    )


def _format_location(location: tuple[Any, ...]) -> str:
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text or "(top level)"


def describe_validation_error(error: ValidationError) -> str:
    """Operator-facing text: one line per problem, key path first, value shown unless secret."""
    lines = []
    for problem in error.errors():
        location = tuple(problem.get("loc", ()))
        key = _format_location(location)
        kind = problem.get("type", "")
        message = problem.get("msg", "invalid")
        if kind == "missing":
            lines.append(f"{key}: required key is missing")
            continue
        if kind == "extra_forbidden":
            lines.append(f"{key}: unknown key (check the spelling; see config.example.toml)")
            continue
        value = problem.get("input")
        if _is_secret_location(location):
            lines.append(f"{key}: {message} (got ***)")
            continue
        if isinstance(value, dict | list):
            # A whole section failed a cross-field check: the message names the keys, and
            # echoing the section could print a secret that sits beside them.
            lines.append(f"{key}: {message}")
            continue
        lines.append(f"{key}: {message} (got {value!r})")
    return "\n".join(lines)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except PermissionError as exc:
        raise ConfigError(f"config file not readable: {path} ({exc.strerror})") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"config path is a directory, not a file: {path}") from exc
    except OSError as exc:
        raise ConfigError(f"config file not readable: {path} ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text: {exc.reason}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def read_credential(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """A credential systemd passed with `LoadCredential=`; None outside such a service.

    One trailing newline is dropped (`echo secret > file` adds it). An empty or unreadable
    credential is a configuration error rather than a silent fall-back to another source.
    """
    directory = (os.environ if env is None else env).get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"credential {path} is not readable: {exc}") from exc
    value = text.removesuffix("\n").removesuffix("\r")
    if not value:
        raise ConfigError(f"credential {path} is empty")
    return value


def _credential_file(name: str) -> Path | None:
    """The file of a `LoadCredential=` credential, if this runs as such a service.

    A path, not the contents (as `read_credential` gives): ssl loads keys from files.
    """
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    return path if path.exists() else None


def load_settings(path: Path | None) -> Settings:
    """The one way settings are built, shared by `run` and `check-config`.

    The client secret may come from systemd's `LoadCredential=` ($CREDENTIALS_DIRECTORY),
    or, for commands run by hand outside the service, from a `client_secret` file beside
    the config (where the unit loads it from): either beats the file's value, and
    BLYNK_GATEWAY_CLOUD__CLIENT_SECRET still beats both.

    The MQTT client key the same way: the credential `mqtt_client_key` replaces
    `mqtt.key_file` (the service user cannot read the root-only original); by hand, the
    config's `key_file` is read where it is. BLYNK_GATEWAY_MQTT__KEY_FILE beats both.
    """
    file_values = read_toml(path) if path is not None else {}
    secret = read_credential(CLIENT_SECRET_CREDENTIAL)
    if secret is None and path is not None:
        beside_config = {"CREDENTIALS_DIRECTORY": str(path.parent)}
        secret = read_credential(CLIENT_SECRET_CREDENTIAL, beside_config)
    if secret is not None and isinstance(file_values.setdefault("cloud", {}), dict):
        file_values["cloud"]["client_secret"] = secret
    key_file = _credential_file(MQTT_KEY_CREDENTIAL)
    if key_file is not None and isinstance(file_values.setdefault("mqtt", {}), dict):
        file_values["mqtt"]["key_file"] = str(key_file)
    try:
        return Settings(**file_values)
    except SettingsError as exc:
        # e.g. BLYNK_GATEWAY_MQTT='not json': pydantic-settings names the field and source.
        raise ConfigError(f"invalid environment override: {exc}") from exc
    except ValidationError as exc:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(
            f"invalid configuration{where}:\n{describe_validation_error(exc)}"
        ) from exc
