"""MQTT → store: readings are committed to the buffer before the broker gets its PUBACK.

- ingest.py      `MqttIngest`: group commit, holding acks while the buffer cannot take more
- mqtt_loop.py   `MqttConnection`: paho on the asyncio event loop, reconnects, the ack barrier
- admission.py   what a message becomes: a reading, a dead letter (reason code), or nothing
- redelivery.py  `RedeliveryFilter`: recognises the broker's redeliveries (pure, bounded LRU)
- routes.py      topic → datastream, payload → value and timestamp (`PayloadError` codes)
"""

from gateway.ingest.admission import Admission, RefusalLog
from gateway.ingest.ingest import MqttIngest
from gateway.ingest.mqtt_loop import MqttConnection
from gateway.ingest.redelivery import LruCounter, RedeliveryFilter
from gateway.ingest.routes import (
    Route,
    RouteTable,
    decode_value,
    encode_value,
    has_own_timestamp,
    topic_matches,
)
from gateway.ingest.stats import IngestStats

__all__ = [
    "Admission",
    "IngestStats",
    "LruCounter",
    "MqttConnection",
    "MqttIngest",
    "RedeliveryFilter",
    "RefusalLog",
    "Route",
    "RouteTable",
    "decode_value",
    "encode_value",
    "has_own_timestamp",
    "topic_matches",
]
