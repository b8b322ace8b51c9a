"""Routes: which messages feed which Blynk datastreams, and how their payloads are read.

- topics.py      topic filters with `{device}` / `{stream}` levels (`TopicTemplate`)
- payloads.py    dotted JSON paths, SenML (RFC 8428) records
- timestamps.py  epoch s/ms/µs, ISO 8601, naive local time; which times to trust
- values.py      numbers, switches (`ON` → 1), "no reading" words (`nan`), datastream types
- table.py       `RouteTable.route(topic, payload, ...)` → `Outcome` (readings, refusals)
"""

from gateway.ingest.routes.payloads import JsonPath, senml_records
from gateway.ingest.routes.table import CompiledRoute, Outcome, Refusal, RouteTable, Target
from gateway.ingest.routes.timestamps import TimestampReader, epoch_to_ms, untrusted_reason
from gateway.ingest.routes.topics import TopicTemplate, topic_matches
from gateway.ingest.routes.values import (
    MAX_SAFE_INTEGER,
    conform_to_type,
    decode_value,
    encode_value,
    field_value_json,
    has_own_timestamp,
)

__all__ = [
    "MAX_SAFE_INTEGER",
    "CompiledRoute",
    "JsonPath",
    "Outcome",
    "Refusal",
    "RouteTable",
    "Target",
    "TimestampReader",
    "TopicTemplate",
    "conform_to_type",
    "decode_value",
    "encode_value",
    "epoch_to_ms",
    "field_value_json",
    "has_own_timestamp",
    "senml_records",
    "topic_matches",
    "untrusted_reason",
]
