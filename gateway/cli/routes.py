"""`blynk-gateway routes test|suggest`: check a mapping before any reading depends on it.

`test` runs one message through the same `RouteTable` and age rule the daemon uses, so what
it prints is what the daemon would store, and what its `sample` rule does to each reading
(its window, or kept or suppressed against the last reading the buffer says was kept).
`suggest` listens to the broker for a while and prints `[devices]` and `[[routes]]` blocks
for the publishers it recognises, with a `sample` rule for a device that sends more than
its daily quota.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.cli.common import EXIT_FAILURE, EXIT_OK
from gateway.errors import GatewayError


def add_parser(commands: Any) -> None:
    routes = commands.add_parser("routes", help="try routes on a message, or suggest routes")
    verbs = routes.add_subparsers(dest="routes_command", required=True, metavar="VERB")
    test = verbs.add_parser("test", help="show what one message would become")
    test.add_argument("--config", "-c", type=Path, required=True, help="TOML config file")
    test.add_argument("topic")
    test.add_argument("payload", help="the payload text; '-' reads it from stdin")
    test.add_argument("--retained", action="store_true", help="as if replayed by the broker")
    test.add_argument("--json", action="store_true", help="machine-readable output")
    suggest = verbs.add_parser("suggest", help="listen to the broker and propose routes")
    suggest.add_argument("--config", "-c", type=Path, required=True, help="TOML config file")
    suggest.add_argument("--seconds", type=float, default=30.0, help="how long to listen")
    suggest.add_argument("--topic", default="#", help="topic filter to listen to")


def run(args: argparse.Namespace) -> int:
    from gateway.config import load_settings

    settings = load_settings(args.config)
    if args.routes_command == "test":
        payload = sys.stdin.buffer.read() if args.payload == "-" else args.payload.encode()
        return _test(settings, args.topic, payload, retained=args.retained, as_json=args.json)
    return _suggest(settings, args.seconds, args.topic)


def _test(settings: Any, topic: str, payload: bytes, *, retained: bool, as_json: bool) -> int:
    from gateway.ingest.routes import RouteTable

    table = RouteTable(
        settings.routes,
        settings.mqtt.max_payload_bytes,
        settings.devices,
        daily_points_limit=settings.cloud.daily_points_limit,
    )
    now_ms = time.time_ns() // 1_000_000
    outcome = table.route(topic, payload, now_ms, retained=retained)
    cutoff_ms = settings.cloud.oldest_sendable_ms(now_ms)
    readings = [r for r in outcome.readings if r.ts_ms >= cutoff_ms]
    refused = [
        {"code": r.code, "detail": r.detail, "datastream_id": r.datastream_id}
        for r in outcome.refusals
    ] + [
        {
            "code": "expired",
            "detail": f"ts {r.ts_ms} is older than the cloud accepts (cutoff {cutoff_ms})",
            "datastream_id": r.datastream_id,
        }
        for r in outcome.readings
        if r.ts_ms < cutoff_ms
    ]
    notes = _notes(outcome)
    rejected = _rejected_reason(outcome, readings, refused, notes)
    sampling = _sampling(settings, table, outcome.route, readings)
    if as_json:
        report = {
            "route": outcome.route.name if outcome.route else None,
            "readings": [
                {
                    "device_id": r.device_id,
                    "datastream_id": r.datastream_id,
                    "ts": r.ts_ms,
                    "value": json.loads(r.value_json),
                }
                | ({"sampling": verdict} if verdict is not None else {})
                for r, verdict in zip(readings, sampling, strict=True)
            ],
            "rejected": rejected,
            "refused": refused,
            "notes": notes,
        }
        print(json.dumps(report, ensure_ascii=False))
    else:
        if outcome.route is not None:
            print(f"route: {outcome.route.name}")
        for r, verdict in zip(readings, sampling, strict=True):
            print(
                f"device={r.device_id} datastream={r.datastream_id} ts={r.ts_ms} "
                f"({_iso(r.ts_ms)}) value={r.value_json}"
            )
            if verdict is not None:
                print(f"  sample: {verdict['rule']}: {verdict['outcome']}: {verdict['detail']}")
        for item in refused:
            print(f"refused datastream={item['datastream_id']}: {item['code']}: {item['detail']}")
        for note in notes:
            print(f"note: {note}")
        if not readings:
            print(f"no reading: {rejected}")
    return EXIT_OK if readings else EXIT_FAILURE


def _sampling(
    settings: Any, table: Any, route: Any, readings: list[Any]
) -> list[dict[str, Any] | None]:
    """What each reading's `sample` rule does with it; the buffer (if there is one) tells
    the windows already sent and the last reading each deadband kept."""
    import asyncio

    from gateway.models import StreamKey
    from gateway.sampling import DeadbandRule, deadband_verdict, format_duration_ms
    from gateway.store.windows import NO_BOUND, SamplingState

    rules = [
        table.rule_for(route, r.device_id, r.datastream_id) if route is not None else None
        for r in readings
    ]
    state = SamplingState(0)
    path = settings.store.path
    if any(rules) and path.exists():
        state = asyncio.run(_buffer_sampling(path))
    verdicts: list[dict[str, Any] | None] = []
    last: dict[StreamKey, tuple[int, str]] = {}
    for reading, rule in zip(readings, rules, strict=True):
        if rule is None:
            verdicts.append(None)
            continue
        key = StreamKey(reading.device_id, reading.datastream_id)
        verdict: dict[str, Any] = {"rule": rule.describe()}
        if isinstance(rule, DeadbandRule):
            keep, why = deadband_verdict(
                rule, last.get(key) or state.kept.get(key), reading.ts_ms, reading.value_json
            )
            if keep:
                last[key] = (reading.ts_ms, reading.value_json)
            outcome, detail = why.split(": ", 1)
            verdicts.append(verdict | {"outcome": outcome, "detail": detail})
            continue
        start = rule.start_of(reading.ts_ms)
        window = f"{_iso(start)} + {format_duration_ms(rule.window_ms)}"
        verdict |= {"window_start": start, "window_end": start + rule.window_ms}
        if reading.ts_ms < state.sent_until.get(key, NO_BOUND):
            verdict |= {"outcome": "late", "detail": f"window {window} was already sent"}
        else:
            verdict |= {
                "outcome": "windowed",
                "detail": f"folded into the point of window {window}, stamped with its "
                f"start, sent once the window is {format_duration_ms(rule.grace_ms)} past "
                "its end without a reading for it",
            }
        verdicts.append(verdict)
    return verdicts


async def _buffer_sampling(path: Path) -> Any:
    from gateway.store import Store

    store = await Store.open(path)
    try:
        return store.sampling
    finally:
        await store.close()


def _notes(outcome: Any) -> list[str]:
    notes = []
    if outcome.ts_replaced:
        notes.append(f"payload time not trusted ({outcome.ts_problem}): receive time used")
    if outcome.no_reading:
        notes.append(f"{outcome.no_reading} value(s) say 'no reading' (null, nan, unavailable)")
    if outcome.retained_skipped:
        notes.append(
            f"{outcome.retained_skipped} reading(s) skipped: a retained replay without a "
            'payload time (set retained = "accept" on the route to take them)'
        )
    return notes


def _rejected_reason(
    outcome: Any, readings: list[Any], refused: list[dict[str, Any]], notes: list[str]
) -> str | None:
    from gateway.ingest.admission import unmapped_hint

    if readings:
        return None
    if outcome.unmapped is not None:
        reason = f"{outcome.unmapped}: {outcome.unmapped_detail}"
        if outcome.unknown_device is not None:
            reason += f" ({unmapped_hint(outcome.unknown_device)})"
        return reason
    if refused:
        return "; ".join(f"{item['code']}: {item['detail']}" for item in refused)
    return notes[0] if notes else "the message holds no value"


def _iso(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).isoformat(timespec="milliseconds")


def _suggest(settings: Any, seconds: float, topic_filter: str) -> int:
    from gateway.ingest.routes.suggest import Observed, suggest_config

    observed = Observed()
    _listen(settings, seconds, topic_filter, observed)
    if not observed.messages:
        print(f"# nothing was published on {topic_filter!r} in {seconds:g} s", file=sys.stderr)
        return EXIT_FAILURE
    print(suggest_config(observed, settings.cloud.daily_points_limit))
    return EXIT_OK


def _listen(settings: Any, seconds: float, topic_filter: str, observed: Any) -> None:
    """A plain, clean-session paho client: it must not touch the daemon's session."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    mqtt_settings = settings.mqtt
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"{mqtt_settings.client_id}-suggest-{int(time.time())}"[:64],
        clean_session=True,
    )
    if mqtt_settings.username is not None:
        password = mqtt_settings.password
        client.username_pw_set(
            mqtt_settings.username, password.get_secret_value() if password else None
        )
    client.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe(topic_filter, qos=0)
    client.on_message = lambda _c, _u, message: observed.add(
        message.topic, bytes(message.payload), retained=bool(message.retain)
    )
    try:
        client.connect(mqtt_settings.host, mqtt_settings.port, keepalive=30)
    except OSError as exc:
        raise GatewayError(
            f"cannot reach the broker at {mqtt_settings.host}:{mqtt_settings.port}: {exc}"
        ) from exc
    client.loop_start()
    try:
        time.sleep(seconds)
    finally:
        client.disconnect()
        client.loop_stop()
