"""The interface every engine implements, so the component runtime treats them alike.

The runtime owns the lifecycle (pending -> starting -> ready -> draining -> stopped |
failed); an engine only knows how to start, answer a health probe, serve invocations,
report that its process exited, and stop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.components.privileges import EngineIdentity
from agent.devices.base import Device
from common.workflow.catalog import ExecutorSpec


class EngineError(Exception):
    """An invocation that did not produce outputs.

    ``code`` is one of invalid_input | tool_error | engine_failed | timeout | output_too_large;
    ``retryable`` says whether another replica might succeed (an engine crash is, a bad input is not).
    """

    def __init__(self, code: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


@dataclass
class EngineContext:
    """What the runtime hands an engine when it creates it."""

    component_id: str
    executor: ExecutorSpec
    devices: list[Device]  # the devices assigned to this component (may be empty for tools)
    log_path: Path  # the component's own log file
    work_dir: Path  # a directory the engine may write to
    port: int | None = None  # a loopback port reserved for engines that listen
    model_dir: Path = Path(".")  # expands {model_dir} in model paths
    python: str = ""  # interpreter for engine subprocesses ("" means the agent's own)
    env: dict[str, str] = field(default_factory=dict)  # extra environment for engine subprocesses
    # The account engine processes drop to (the agent is root); None: they run as the agent's user.
    identity: EngineIdentity | None = None


class Engine(ABC):
    simulated: bool = False

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx

    @abstractmethod
    async def start(self) -> None:
        """Begin starting (spawn a process, open a pool) and return without waiting for readiness."""

    @abstractmethod
    async def probe(self) -> bool:
        """True once the engine serves invocations; never raises for an engine that is still starting."""

    def exit_code(self) -> int | None:
        """The exit status of the engine's process once it has ended; None while it runs or if it has none."""
        return None

    @property
    def pid(self) -> int | None:
        return None

    @abstractmethod
    async def invoke(self, task: str, inputs: dict[str, Any], knobs: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Compute the task's outputs; raise EngineError when that fails."""

    @abstractmethod
    async def stop(self, grace_s: float) -> None:
        """Stop, escalating to a kill after ``grace_s``; safe to call twice or after a crash."""
