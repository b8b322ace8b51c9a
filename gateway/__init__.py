"""blynk-edge-gateway: local MQTT readings, durably buffered, uploaded to the Blynk cloud."""

__version__ = "0.1.0"
