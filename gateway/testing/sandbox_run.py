"""Running the sandbox cloud outside a test's event loop: a thread for sync code, a server.

`SandboxThread` gives sync tests and benchmarks a sandbox on a private loop; `run_sandbox`
serves one in the foreground for `blynk-gateway sandbox` (and the demo).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

from gateway.testing.sandbox import SandboxCloud
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


def run_sandbox(host: str, port: int, cloud: SandboxCloud) -> int:
    """Serve in the foreground until SIGINT/SIGTERM, then stop cleanly (exit code 0)."""

    async def run() -> None:
        task = asyncio.ensure_future(serve(host, port, cloud))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):  # a signal; serve() cleaned up
            await task

    asyncio.run(run())
    return 0
