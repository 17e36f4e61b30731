"""``murakkab-agent --config PATH``: run the node agent daemon."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from agent.components.privileges import resolve_engine_identity
from agent.config import load_agent_config
from agent.daemon import Agent
from agent.devices.base import DeviceError
from agent.devices.select import open_devices, fault_hook
from common.config import ConfigError
from common.security.curve import KeyFileError
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
    try:  # before the devices: a missing engine account is a config error, as a bad field is
        resolve_engine_identity(config.agent.engine_user, config.agent.engine_group)
    except ConfigError as exc:
        print(f"murakkab-agent: {exc}", file=sys.stderr)
        return 2
    start_s = time.monotonic()
    try:
        devices = open_devices(config.devices.backend, node_name=config.agent.node_name, sim=config.devices.sim,
                               cpu=config.devices.cpu, include_cpu=config.devices.include_cpu, start_s=start_s)
    except DeviceError as exc:
        print(f"murakkab-agent: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        agent = Agent(config.agent, devices, mqtt=config.mqtt)
        hook = fault_hook(config.devices.sim, devices, start_s)
        if hook is not None:
            agent.tick_hooks.append(hook)
        await agent.run(stop_event_on_signals())

    try:
        asyncio.run(run())
    except KeyFileError as exc:  # no key for this node yet, or a broken one: a restart cannot fix it
        print(f"murakkab-agent: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
