"""Tell the parent a server is up, then wait for the signal that stops it.

`load_tests.procs.start` waits for the line ``listening http://HOST:PORT`` on a child's stdout
before it uses the child: every server the project runs as a subprocess (the simulator, the
benchmark's instant worker and bare proxy) prints it once bound, through here, and stops on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import signal


def listening_line(host: str, port: int) -> str:
    """``listening http://HOST:PORT``, an IPv6 host in brackets."""
    shown = f"[{host}]" if ":" in host else host
    return f"listening http://{shown}:{port}"


async def announce_until_stopped(host: str, port: int) -> None:
    """Print the listening line for ``host:port``, then return on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(listening_line(host, port), flush=True)
    await stop.wait()
