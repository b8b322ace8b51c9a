"""The rtnetlink watcher, in a private network namespace so the host's network is untouched.

`unshare --net` gives the child process its own namespace (only a loopback, down); the
child starts a `NetworkWatcher`, brings the loopback up and adds an address, and reports
whether the watcher saw it. Needs root (as CI runs) and iproute2.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import asyncio, subprocess
    from gateway.uplink.netwatch import NetworkWatcher

    async def main() -> None:
        watcher = NetworkWatcher()
        assert watcher.start(), "netlink socket refused"
        flag = watcher.changed.listen()
        await asyncio.sleep(0.1)
        assert not flag.is_set(), "no change yet"
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "addr", "add", "10.231.0.1/32", "dev", "lo"], check=True)
        await asyncio.wait_for(flag.wait(), 5)
        print("events", watcher.events)
        watcher.close()

    asyncio.run(main())
    """
)


def test_a_link_and_address_change_is_noticed() -> None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.fail("util-linux 'unshare' and iproute2 'ip' are needed (Debian: both standard)")
    result = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", CHILD],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) >= 1
