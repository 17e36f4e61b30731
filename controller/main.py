"""``murakkab-controller --config PATH``: run the controller daemon."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from common.config import ConfigError
from common.daemon import setup_logging, stop_event_on_signals
from controller.config import load_controller_config
from controller.daemon import Controller
from controller.security.keyring import KeyringError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="murakkab-controller", description="Murakkab controller daemon")
    parser.add_argument("--config", type=Path, required=True, help="controller TOML file")
    args = parser.parse_args(argv)
    try:
        config = load_controller_config(args.config)
        settings = config.controller
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    setup_logging(settings.log_level, "murakkab-controller")

    async def run() -> None:
        await Controller(settings, mqtt=config.mqtt).run_forever(stop_event_on_signals())

    try:
        asyncio.run(run())
    except KeyringError as exc:  # no keys yet, or a broken keyring: restarting cannot fix it
        print(f"murakkab-controller: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
