"""Reload on SIGHUP (`systemctl reload`): new routes, devices, credentials and flush settings
without a restart, so buffered data and the MQTT session are never touched.

The file is read and validated first; an invalid file changes nothing (`reload_refused`
names the key). What can change live: `[[routes]]` and `[devices]` (subscriptions follow:
new filters subscribed, gone ones unsubscribed, on the same session), `[flush]`, and the
cloud's credentials, quota and age settings. What cannot (`[mqtt]`, `[store]`, `[log]`,
`[metrics]`, `[clock]`, `cloud.server`, `cloud.timeout_s`) keeps its old value and is
named in the log line, so the operator knows a restart is needed. Parked streams are
retried: the reload may have fixed their ids.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol

from gateway.config import CloudSettings, FlushSettings, Settings, load_settings
from gateway.errors import ConfigError
from gateway.ingest import RouteTable
from gateway.log import get_logger, scrubber
from gateway.ops.systemd import ServiceNotifier

log = get_logger("reload")

# Sections used once, at start-up: a change waits for a restart.
RESTART_SECTIONS = ("mqtt", "store", "log", "metrics", "clock")
RESTART_CLOUD_KEYS = ("server", "timeout_s")


class Reconfigurable(Protocol):
    """What a reload may change in the running gateway: routes, the cloud and flush
    settings, and the settings it reports; nothing else of it is reachable from here."""

    @property
    def settings(self) -> Settings: ...

    def running(self) -> bool:
        """True once ingest and the flush loop exist (a reload before that is refused)."""
        ...

    def replace_routes(self, routes: RouteTable) -> tuple[list[str], list[str]]:
        """Route with `routes` from now on; the (subscribed, unsubscribed) filters."""
        ...

    def reconfigure_uplink(self, cloud: CloudSettings, flush: FlushSettings) -> None:
        """New credentials, quota, age and flush settings for the upload side."""
        ...

    def settings_applied(self, settings: Settings) -> None:
        """The settings now in force (what status and the next reload compare against)."""
        ...

    async def unpark_all(self) -> None:
        """Retry parked streams at once: the reload may have fixed their ids."""
        ...


def needs_restart(old: Settings, new: Settings) -> list[str]:
    """The changed keys a reload cannot apply, by name (`mqtt`, `cloud.server`)."""
    changed = [
        name
        for name in RESTART_SECTIONS
        if hasattr(old, name) and getattr(old, name) != getattr(new, name)
    ]
    changed += [
        f"cloud.{key}"
        for key in RESTART_CLOUD_KEYS
        if getattr(old.cloud, key) != getattr(new.cloud, key)
    ]
    return changed


async def reload_config(gateway: Reconfigurable, path: Path) -> bool:
    """Apply the file at `path` to the running gateway; False (and nothing changed) if the
    file is invalid or the gateway is not running yet."""
    if not gateway.running():
        log.warning("reload_refused", reason="the gateway is still starting")
        return False
    try:
        new = await asyncio.to_thread(load_settings, path)
    except ConfigError as exc:
        log.error(
            "reload_refused",
            config=str(path),
            reason=str(exc),
            action="the previous configuration stays in force",
        )
        return False
    old = gateway.settings
    restart = needs_restart(old, new)
    kept = {name: getattr(old, name) for name in RESTART_SECTIONS if hasattr(old, name)}
    cloud_settings = new.cloud.model_copy(
        update={key: getattr(old.cloud, key) for key in RESTART_CLOUD_KEYS}
    )
    applied = new.model_copy(update={**kept, "cloud": cloud_settings})
    scrubber.register(*applied.secret_values())
    # A new route table re-plans `sample = "fit"` for the new routes and daily limit.
    routes = RouteTable(
        applied.routes,
        applied.mqtt.max_payload_bytes,
        devices=applied.devices,
        daily_points_limit=applied.cloud.daily_points_limit,
    )
    subscribed, unsubscribed = gateway.replace_routes(routes)
    gateway.reconfigure_uplink(applied.cloud, applied.flush)
    gateway.settings_applied(applied)
    await gateway.unpark_all()
    log.info(
        "config_reloaded",
        config=str(path),
        routes=len(routes.routes),
        devices=len(routes.devices),
        subscribed=subscribed,
        unsubscribed=unsubscribed,
        needs_restart=restart or None,
    )
    return True


async def serve_reloads(
    gateway: Reconfigurable, notifier: ServiceNotifier, path: Path, requested: asyncio.Event
) -> None:
    """One reload per request (SIGHUP); requests during a reload fold into one more."""
    while True:
        await requested.wait()
        requested.clear()
        notifier.reloading("reloading configuration")
        ok = False
        try:
            ok = await reload_config(gateway, path)
        finally:
            notifier.ready("configuration reloaded" if ok else "reload refused")
