"""An in-process cluster over loopback ZeroMQ: the real Controller and real Agents in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from agent.config import AgentSettings
from agent.daemon import Agent
from agent.devices.sim import open_sim_devices
from controller.config import ControllerSettings
from controller.daemon import Controller
from tests.keys import ClusterKeys, make_keys

FAST = dict(heartbeat_interval_s=0.1, suspect_after_s=0.6, lost_after_s=1.5, tick_interval_s=0.05)


@dataclass
class InProcessCluster:
    controller: Controller
    agents: dict[str, Agent]
    stops: dict[str, asyncio.Event] = field(default_factory=dict)
    tasks: dict[str, asyncio.Task] = field(default_factory=dict)
    keys: ClusterKeys | None = None  # None when the controller runs with insecure = true

    @property
    def admin_address(self) -> str:
        return self.controller.admin_endpoint

    async def restart_controller(self) -> Controller:
        """Stop the controller and start a new one on the same state directory and addresses.

        The agents keep running and find the new controller where they look for the old one;
        the new controller starts with the next epoch and resumes the stored jobs.
        """
        old = self.controller
        settings = old.settings.model_copy(update={"agent_bind": old.agent_endpoint, "admin_bind": old.admin_endpoint})
        await old.close()
        self.controller = Controller(settings, mqtt=old.mqtt_settings)
        await self.controller.start()
        return self.controller

    async def stop_agent(self, name: str) -> None:
        self.stops[name].set()
        await asyncio.wait_for(self.tasks[name], 5)


def agent_key_settings(keys: ClusterKeys | None, name: str) -> dict[str, Any]:
    """AgentSettings fields for node ``name``: its key files, or insecure without keys."""
    if keys is None:
        return {"insecure": True}
    if name not in keys.nodes:
        keys.add_node(name)
    return {"key_file": keys.nodes[name], "controller_key_file": keys.server_public}


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def in_process_cluster(tmp_path: Path, nodes: int = 2, gpus: int = 2, model: str = "h100",
                             utilization: float = 1.0,
                             controller_settings: dict[str, Any] | None = None, mqtt: Any = None,
                             node_labels: dict[str, dict[str, str]] | None = None) -> AsyncIterator[InProcessCluster]:
    """``controller_settings`` overrides fields of the controller's settings (e.g. invocation timeouts);
    ``mqtt`` (common.mqtt.settings.MqttSettings) is the controller's [mqtt] table; ``node_labels`` gives nodes
    (``node-0``, ...) their labels, e.g. ``{"node-0": {"rack": "r1"}}``.

    The sockets use CURVE with keys made for the test (an ``admin`` user key, one node key per
    agent) unless ``controller_settings`` says ``insecure=True``; while the cluster runs,
    ``MURAKKAB_KEY`` and ``MURAKKAB_SERVER_KEY`` name the admin key, so murakkabctl's ``main``
    and ``AdminClient`` reach it as an operator's shell would.
    """
    names = [f"node-{i}" for i in range(nodes)]
    insecure = bool((controller_settings or {}).get("insecure", False))
    keys = None if insecure else make_keys(tmp_path / "keys", names, {"admin": "admin"})
    settings = ControllerSettings(**{**dict(agent_bind="tcp://127.0.0.1:*", admin_bind="tcp://127.0.0.1:*",
                                            state_dir=tmp_path / "controller", metrics_port=0,
                                            keys_dir=tmp_path / "keys", **FAST),
                                     **(controller_settings or {})})
    saved_env = {name: os.environ.get(name) for name in ("MURAKKAB_KEY", "MURAKKAB_SERVER_KEY", "MURAKKAB_INSECURE")}
    os.environ.update(keys.env() if keys else {"MURAKKAB_INSECURE": "1"})
    for name in ("MURAKKAB_KEY", "MURAKKAB_SERVER_KEY") if insecure else ("MURAKKAB_INSECURE",):
        os.environ.pop(name, None)
    controller = Controller(settings, mqtt=mqtt)
    await controller.start()
    ctx = zmq.Context()
    cluster = InProcessCluster(controller, {}, keys=keys)
    try:
        for i, name in enumerate(names):
            agent_settings = AgentSettings(
                node_name=name, controller=controller.agent_endpoint, state_dir=tmp_path / name,
                heartbeat_interval_s=FAST["heartbeat_interval_s"], sample_interval_s=0.05, request_timeout_s=0.5,
                reconnect_base_s=0.05, reconnect_cap_s=0.5, metrics_enabled=(i == 0), metrics_port=0,
                # Tools run in the agent's threads, as before issue 14 (ignored unless root): the engine account
                # may not reach this interpreter or tmp_path; test_engine_privileges.py tests the account.
                engine_user="root", labels=dict((node_labels or {}).get(name, {})),
                **agent_key_settings(keys, name))
            devices = open_sim_devices(node_name=name, model=model, count=gpus, seed=i, utilization=utilization,
                                       ambient_c=25.0, start_s=time.monotonic())
            agent = Agent(agent_settings, devices, ctx=ctx)
            cluster.agents[name] = agent
            cluster.stops[name] = asyncio.Event()
            cluster.tasks[name] = asyncio.create_task(agent.run(cluster.stops[name]))
        await wait_until(lambda: all(controller.registry.nodes.get(n) is not None
                                     and controller.registry.nodes[n].state == "ready" for n in cluster.agents),
                         what="all nodes ready")
        yield cluster
    finally:
        for stop in cluster.stops.values():
            stop.set()
        await asyncio.gather(*cluster.tasks.values(), return_exceptions=True)
        await cluster.controller.close()
        ctx.destroy(linger=0)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
