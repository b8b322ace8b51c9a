"""The baseline client of `drain_cloud.py`: a bare `httpx.Client` posting the daemon's batches.

Run by `drain_cloud.httpx_drain` as a script of its own, against the same sandbox cloud
the daemon drained into:

    python benchmarks/httpx_poster.py BASE_URL READINGS BASE_TS BATCH_SIZE [CONCURRENCY]

It fetches a token once, builds every body before the first request (`bodies`: the
daemon's batch size, its round-robin order over datastreams, the same JSON), then posts
them in that order, CONCURRENCY at a time (default 1; the daemon's default is 4, issue
18), over one keep-alive pool. Exits non-zero if the sandbox refuses one.
"""

from __future__ import annotations

import argparse

import startup_backlog
from startup_backlog import STREAMS

from gateway.testing.process import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET
from gateway.testing.sandbox import IMPORT_PATH, TOKEN_PATH

BATCH_SIZE = 1000  # the daemon's default flush.batch_size (drain_cloud.BATCH_SIZE)


def bodies(readings: int, base_ts: int, batch_size: int = BATCH_SIZE) -> list[bytes]:
    """The import/batch bodies the daemon sends for `startup_backlog.build`'s rows, in its
    order: one batch per datastream per pass, oldest first, `gateway.uplink.cloud.build_body`'s
    JSON."""
    per_stream: list[list[str]] = [[] for _ in range(STREAMS)]
    for stream_id, ts_ms, value in startup_backlog.rows(readings, base_ts):
        per_stream[stream_id - 1].append(f'{{"value":{value},"ts":{ts_ms}}}')
    out: list[bytes] = []
    for offset in range(0, max(map(len, per_stream)), batch_size):
        for index, points in enumerate(per_stream):
            chunk = points[offset : offset + batch_size]
            if chunk:
                device = 300 + index
                out.append(
                    f'{{"deviceId":{device},"dataStreamId":1,"values":[{",".join(chunk)}]}}'.encode()
                )
    return out


def post_all(
    base_url: str, readings: int, base_ts: int, batch_size: int, concurrency: int = 1
) -> None:
    """Token once, then POST every batch in order, `concurrency` at a time (threads sharing
    one client: its pool keeps a connection per thread)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    payloads = bodies(readings, base_ts, batch_size)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(base_url=base_url, timeout=30, limits=limits) as client:
        token = client.post(
            TOKEN_PATH,
            params={"grant_type": "client_credentials"},
            auth=(SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET),
        ).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

        def post(body: bytes) -> None:
            try:
                response = client.post(IMPORT_PATH, content=body, headers=headers)
            except httpx.TransportError:  # a keep-alive connection closed under us: again,
                response = client.post(IMPORT_PATH, content=body, headers=headers)  # as the
                # daemon would (it retries on its next pass)
            if response.status_code != 204:
                raise SystemExit(f"sandbox answered {response.status_code}: {response.text}")

        if concurrency <= 1:
            for body in payloads:
                post(body)
            return
        with ThreadPoolExecutor(concurrency) as pool:
            for result in pool.map(post, payloads):
                del result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("base_url")
    parser.add_argument("readings", type=int)
    parser.add_argument("base_ts", type=int)
    parser.add_argument("batch_size", type=int)
    parser.add_argument("concurrency", type=int, nargs="?", default=1)
    args = parser.parse_args()
    post_all(args.base_url, args.readings, args.base_ts, args.batch_size, args.concurrency)


if __name__ == "__main__":
    main()
