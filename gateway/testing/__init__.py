"""The development kit: a private Mosquitto broker, a Blynk-compatible sandbox cloud, an
acknowledged QoS-1 publisher, a runner for the daemon as a subprocess, and the demo.

Used by the tests, the benchmarks and the CLI's ``sandbox`` and ``demo`` commands; the daemon
itself never imports it.
"""
