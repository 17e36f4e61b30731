"""Shared code of the controller and the agents: protocol, transport, config, types."""

__version__ = "0.1.0"
