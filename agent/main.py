"""``murakkab-agent --config PATH``: run the node agent daemon."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from agent.config import load_agent_config
from agent.daemon import Agent
from agent.devices.base import DeviceError
from agent.devices.select import open_devices, fault_hook
from common.config import ConfigError
from common.daemon import setup_logging, stop_event_on_signals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="murakkab-agent", description="Murakkab node agent daemon")
    parser.add_argument("--config", type=Path, required=True, help="agent TOML file")
    args = parser.parse_args(argv)
    try:
        config = load_agent_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    setup_logging(config.agent.log_level, "murakkab-agent")
    start_s = time.monotonic()
    try:
        devices = open_devices(config.devices.backend, node_name=config.agent.node_name, sim=config.devices.sim,
                               cpu=config.devices.cpu, include_cpu=config.devices.include_cpu, start_s=start_s)
    except DeviceError as exc:
        print(f"murakkab-agent: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        agent = Agent(config.agent, devices)
        hook = fault_hook(config.devices.sim, devices, start_s)
        if hook is not None:
            agent.tick_hooks.append(hook)
        await agent.run(stop_event_on_signals())

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
