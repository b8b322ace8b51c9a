"""Operations: what the operator and systemd see of the running gateway, and reload.

`observe` builds the status snapshot that `status_socket` serves to `blynk-gateway status`
and `metrics` exports to Prometheus; `systemd` speaks sd_notify (READY, STATUS, the
watchdog); `reload` applies a changed configuration on SIGHUP; `forecast` estimates what
the quota and the age limit will cost a backlog; `listener` is the bounded accept loop
both listeners share, `clip` how text from outside is shown. Nothing in ingest, store or
uplink imports from here.
"""
