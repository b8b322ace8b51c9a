"""MQTT → store: readings are committed to the buffer before the broker gets its PUBACK.

`MqttIngest` (ingest.py) groups messages into one commit each and holds acknowledgements
while the buffer cannot take them; `routes.py` turns a topic and a payload into a reading.
"""

from gateway.ingest.ingest import IngestStats, MqttIngest
from gateway.ingest.routes import Route, RouteTable, decode_value, encode_value, topic_matches

__all__ = [
    "IngestStats",
    "MqttIngest",
    "Route",
    "RouteTable",
    "decode_value",
    "encode_value",
    "topic_matches",
]
