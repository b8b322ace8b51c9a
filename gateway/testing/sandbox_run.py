"""Running the sandbox cloud outside a test's event loop: a thread for sync code, a server.

`SandboxThread` gives sync tests and benchmarks a sandbox on a private loop,
`SandboxProcess` one in a child process; `run_sandbox` serves one in the foreground for
`blynk-gateway sandbox` (and the demo).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import os
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, overload

from gateway.testing.sandbox import SandboxCloud
from gateway.testing.sandbox_latency import LatencySetting
from gateway.testing.sandbox_rules import check_types

T = TypeVar("T")


class SandboxThread:
    """Runs a :class:`SandboxCloud` on a private loop so sync code can drive it."""

    def __init__(self, cloud: SandboxCloud) -> None:
        self.cloud = cloud
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Blocks until the socket listens, so the caller may connect right away."""
        if self._thread is not None:
            raise RuntimeError("sandbox thread already started")
        ready: concurrent.futures.Future[str] = concurrent.futures.Future()
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                try:
                    ready.set_result(loop.run_until_complete(self.cloud.start(host, port)))
                except BaseException as exc:
                    ready.set_exception(exc)
                    return
                loop.run_forever()
                loop.run_until_complete(self.cloud.stop())
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

        thread = threading.Thread(target=run, name="sandbox-cloud", daemon=True)
        self._loop, self._thread = loop, thread
        thread.start()
        try:
            return ready.result(timeout=30)
        except BaseException:
            thread.join(timeout=5)
            self._loop = self._thread = None
            raise

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)

    @property
    def base_url(self) -> str:
        return self.cloud.base_url

    @overload
    def call(self, fn: Callable[[SandboxCloud], Awaitable[T]]) -> T: ...
    @overload
    def call(self, fn: Callable[[SandboxCloud], T]) -> T: ...
    def call(self, fn: Callable[[SandboxCloud], Any]) -> Any:
        """Run ``fn(cloud)`` on the sandbox loop; an awaitable result is awaited there."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("sandbox thread not running")
        if threading.current_thread() is self._thread:
            raise RuntimeError("call() from the sandbox thread would deadlock; call fn directly")

        async def invoke() -> Any:
            result = fn(self.cloud)
            if inspect.isawaitable(result):
                return await result
            return result

        return asyncio.run_coroutine_threadsafe(invoke(), loop).result(timeout=30)

    def __enter__(self) -> SandboxThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SandboxProcess:
    """A sandbox in a child process, for benchmarks of the whole daemon in this process.

    A sandbox thread would take this process's GIL for every request it serves, which no
    real cloud does: timing a daemon against it measures the sandbox's share too. The
    child writes its accepted-point count into a small file every 5 ms, read here with
    `pread` (no round trip). `latency_ms` delays every answer (`SandboxCloud.set_latency`).
    """

    def __init__(
        self,
        devices: str,
        *,
        daily_points_limit: int,
        counter_path: Path,
        latency_ms: float = 0.0,
        jitter_ms: float = 0.0,
    ) -> None:
        self._devices = devices
        self._daily_points_limit = daily_points_limit
        self._counter_path = counter_path
        self._latency = LatencySetting(latency_ms, jitter_ms)  # a bad value fails here
        self._process: subprocess.Popen[str] | None = None
        self._counter_fd: int | None = None

    def start(self) -> str:
        """Blocks until the child listens; returns its base URL."""
        self._counter_path.write_bytes(bytes(8))
        self._counter_fd = os.open(self._counter_path, os.O_RDONLY)
        code = (
            "import sys; from gateway.testing.sandbox_run import serve_counting; "
            "serve_counting(sys.argv[1], int(sys.argv[2]), sys.argv[3], "
            "float(sys.argv[4]), float(sys.argv[5]))"
        )
        self._process = process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                code,
                self._devices,
                str(self._daily_points_limit),
                str(self._counter_path),
                repr(float(self._latency.latency_ms)),
                repr(float(self._latency.jitter_ms)),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("sandbox_listening url="):
            self.stop()
            raise RuntimeError(f"sandbox process did not start: {line!r}")
        return line.strip().partition("url=")[2]

    def accepted_count(self) -> int:
        """Points the sandbox has accepted (at most 5 ms old)."""
        assert self._counter_fd is not None
        count: int = struct.unpack("<q", os.pread(self._counter_fd, 8, 0))[0]
        return count

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
            if process.stdout is not None:
                process.stdout.close()
        if self._counter_fd is not None:
            os.close(self._counter_fd)
            self._counter_fd = None


def serve_counting(
    devices: str,
    daily_points_limit: int,
    counter_path: str,
    latency_ms: float = 0.0,
    jitter_ms: float = 0.0,
) -> None:
    """SandboxProcess's child: `run_sandbox`, plus the counter file kept current."""
    cloud = SandboxCloud(parse_devices(devices), daily_points_limit=daily_points_limit)
    cloud.set_latency(latency_ms, jitter_ms=jitter_ms)

    async def count_forever() -> None:
        fd = os.open(counter_path, os.O_WRONLY)
        try:
            written = -1
            while True:
                count = cloud.accepted_count()
                if count != written:
                    os.pwrite(fd, struct.pack("<q", count), 0)
                    written = count
                await asyncio.sleep(0.005)
        finally:
            os.close(fd)

    run_sandbox("127.0.0.1", 0, cloud, alongside=count_forever)


def parse_devices(spec: str) -> dict[int, dict[int, str]]:
    """Parse ``"101:5=double,6=string;102:1"`` (the type defaults to double)."""
    devices: dict[int, dict[int, str]] = {}
    for chunk in (c.strip() for c in spec.split(";")):
        if not chunk:
            continue
        dev_text, _, streams_text = chunk.partition(":")
        try:
            device_id = int(dev_text)
        except ValueError:
            raise ValueError(f"bad device id {dev_text!r} in {chunk!r}") from None
        if device_id in devices:
            raise ValueError(f"device {device_id} listed twice")
        streams: dict[int, str] = {}
        for item in (s.strip() for s in streams_text.split(",")):
            if not item:
                continue
            sid_text, _, kind = item.partition("=")
            try:
                stream_id = int(sid_text)
            except ValueError:
                raise ValueError(f"bad datastream id {sid_text!r} in {chunk!r}") from None
            streams[stream_id] = kind.strip().lower() or "double"
        devices[device_id] = check_types(streams)
    return devices


async def serve(host: str, port: int, cloud: SandboxCloud) -> None:
    """Serve until cancelled; the stdout line lets a parent process learn the chosen port."""
    url = await cloud.start(host, port)
    try:
        print(f"sandbox_listening url={url}", flush=True)
        await asyncio.Event().wait()
    finally:
        await cloud.stop()


def run_sandbox(
    host: str,
    port: int,
    cloud: SandboxCloud,
    *,
    alongside: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Serve in the foreground until SIGINT/SIGTERM, then stop cleanly (exit code 0).

    `alongside` runs on the same loop until then (SandboxProcess's counter).
    """

    async def run() -> None:
        task = asyncio.ensure_future(serve(host, port, cloud))
        extra = asyncio.ensure_future(alongside()) if alongside is not None else None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            with contextlib.suppress(asyncio.CancelledError):  # a signal; serve() cleaned up
                await task
        finally:
            if extra is not None:
                extra.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await extra

    asyncio.run(run())
    return 0
