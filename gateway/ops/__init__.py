"""Operations: what the operator and systemd see of the running gateway, and reload.

`observe` builds the status snapshot that `status_socket` serves to `blynk-gateway status`
and `metrics` exports to Prometheus, both behind `listener`'s bounded accept loop (a
connection cap and deadlines, so no client can starve them); `systemd` speaks sd_notify
(READY, STATUS, the watchdog, EXTEND_TIMEOUT_USEC during long store work); `reload`
applies a changed configuration on SIGHUP; `forecast` estimates what the quota and the
age limit will cost a backlog, and `overflow` logs a device arriving above its quota
without a `sample` rule. `observe` reads the gateway through the `ObservedGateway`
protocol and `reload` changes it through `Reconfigurable`: neither imports `app`.
Nothing in ingest, store or uplink imports from here.
"""
