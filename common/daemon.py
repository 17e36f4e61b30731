"""Process plumbing shared by the daemons: logging and signal-driven shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys


def setup_logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
        format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s",
    )


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, so the daemon closes its sockets and exits 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
