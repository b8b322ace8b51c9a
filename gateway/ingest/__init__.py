"""MQTT → store: readings are committed to the buffer before the broker gets its PUBACK.

- ingest.py      `MqttIngest`: group commit, holding acks while the buffer cannot take more
- mqtt_loop.py   `MqttConnection`: paho on the asyncio event loop, reconnects, the ack barrier
- admission.py   what a message becomes: a reading, a dead letter (reason code), or nothing
- redelivery.py  `RedeliveryFilter`: recognises the broker's redeliveries (pure, bounded LRU)
- routes/        topic → device and datastreams, payload → values and times (`Outcome`)
"""

from gateway.ingest.admission import Admission, RefusalLog
from gateway.ingest.ingest import MqttIngest
from gateway.ingest.mqtt_loop import MqttConnection
from gateway.ingest.redelivery import LruCounter, RedeliveryFilter
from gateway.ingest.routes import (
    CompiledRoute,
    Outcome,
    RouteTable,
    decode_value,
    encode_value,
    has_own_timestamp,
    topic_matches,
)
from gateway.ingest.stats import IngestStats

__all__ = [
    "Admission",
    "CompiledRoute",
    "IngestStats",
    "LruCounter",
    "MqttConnection",
    "MqttIngest",
    "Outcome",
    "RedeliveryFilter",
    "RefusalLog",
    "RouteTable",
    "decode_value",
    "encode_value",
    "has_own_timestamp",
    "topic_matches",
]
