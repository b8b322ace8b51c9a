"""The development kit: a private Mosquitto broker (optionally with a TLS listener, test
certificates for it, a TLS terminator in front of it), a Blynk-compatible sandbox cloud,
an acknowledged QoS-1 publisher, a runner for the daemon as a subprocess, fake clocks and
a synchronization switch for the clock's tests, and the demo.

Used by the tests, the benchmarks and the CLI's ``sandbox`` and ``demo`` commands; the daemon
itself never imports it.
"""
