"""Components on a real agent, commanded over loopback ZeroMQ by a stand-in controller endpoint.

Tool components run functions of this module (thread isolation) or of a module the test
writes (subprocess isolation); sim components run on the agent's simulated GPUs.
No real vLLM here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import zmq

from agent.components.engines.base import EngineContext, EngineError
from agent.components.engines.sim import SimEngine
from agent.components.sim_outputs import VECTOR_DIM, simulated_outputs
from agent.config import AgentSettings
from agent.daemon import Agent
from agent.devices.cpu import CpuDevice
from agent.devices.sim import open_sim_devices
from agent.tools.base import ToolError
from common.protocol import (
    CancelInvocation, CommandResult, ComponentReport, Heartbeat, HeartbeatAck, InvocationResult, Invoke, Register,
    RegisterAccepted, StartComponent, StopComponent, build_dispatch,
)
from common.transport import RemoteError, RpcEndpoint, configure_socket
from common.workflow.catalog import ExecutorSpec
from common.workflow.tasks import TASKS
from common.workflow.types import check_value, element_type
from tests.integration.cluster import wait_until

GIB = 1 << 30
CALLS: collections.Counter[str] = collections.Counter()

# --- tools run in the agent's threads ------------------------------------------------------


def echo(inputs: dict[str, Any], knobs: dict[str, Any]) -> dict[str, Any]:
    CALLS[inputs["question"]] += 1
    time.sleep(knobs["delay_ms"] / 1000)
    return {"answer": f"echo: {inputs['question']}"}


def refuse(inputs: dict[str, Any], knobs: dict[str, Any]) -> dict[str, Any]:
    raise ToolError("question must not be empty")


def buggy(inputs: dict[str, Any], knobs: dict[str, Any]) -> dict[str, Any]:
    return {"answer": 42}


# --- tools run in child processes (written to a module the children import) ------------------

CHILD_TOOLS = '''
import os, signal

def answer(inputs, knobs):
    print("a print goes to the component log")
    return {"answer": "[from a child process] " + inputs["question"]}

def crash(inputs, knobs):
    os.kill(os.getpid(), signal.SIGKILL)

def hang(inputs, knobs):
    import time
    time.sleep(60)
'''


def tool_executor(name: str, entry_point: str, *, isolation: str = "thread", max_concurrency: int = 4) -> dict:
    return {"name": name, "task": "chat", "engine": "tool",
            "tool": {"entry_point": entry_point, "isolation": isolation, "max_concurrency": max_concurrency},
            "knobs": {"delay_ms": {"values": [0, 100, 300], "default": 0}}}


def sim_executor(name: str, *, latency_s: float = 0.2, task: str = "embed") -> dict:
    return {"name": name, "task": task, "engine": "sim",
            "sim": {"latency_s": latency_s, "utilization": 0.9, "memory_bytes": 10 * GIB, "startup_s": 0.2}}


EPOCH = 7


class Link:
    """A stand-in controller on loopback ZeroMQ: accepts the agent, records its heartbeats, sends commands.

    Not the real Controller: its reconciler would stop components that are not in its plan.
    """

    def __init__(self, endpoint: RpcEndpoint) -> None:
        self.endpoint = endpoint
        self.epoch = EPOCH
        self.peer = b"node-0"
        self.ids = itertools.count(1)
        self.heartbeats: list[Heartbeat] = []
        self.agent: Agent | None = None
        self.registered = False

    def on_register(self, peer: bytes, msg: Register) -> RegisterAccepted:
        self.registered = True
        return RegisterAccepted(self.epoch, 0.1, "ready")

    def on_heartbeat(self, peer: bytes, msg: Heartbeat) -> HeartbeatAck:
        self.heartbeats.append(msg)
        return HeartbeatAck(self.epoch, "ready")

    @property
    def generation(self) -> int:
        assert self.agent is not None
        return self.agent.generation

    async def call(self, msg: Any, timeout_s: float = 10.0) -> Any:
        return await self.endpoint.request(msg, peer=self.peer, timeout_s=timeout_s)

    async def start(self, component_id: str, executor: dict, devices: tuple[int, ...] = (),
                    command_id: str | None = None) -> CommandResult:
        return await self.call(StartComponent(command_id or f"start-{next(self.ids)}", self.epoch, self.generation,
                                              component_id, executor, devices))

    async def stop(self, component_id: str, drain_timeout_s: float = 5.0) -> CommandResult:
        return await self.call(StopComponent(f"stop-{next(self.ids)}", self.epoch, self.generation, component_id,
                                             drain_timeout_s))

    async def cancel(self, invocation_id: str, reason: str = "job cancelled", epoch: int | None = None) -> Any:
        return await self.call(CancelInvocation(f"cancel-{next(self.ids)}", self.epoch if epoch is None else epoch,
                                                self.generation, invocation_id, reason))

    async def invoke(self, component_id: str, task: str, inputs: dict, knobs: dict | None = None,
                     invocation_id: str | None = None, timeout_s: float = 5.0, epoch: int | None = None
                     ) -> InvocationResult:
        return await self.call(Invoke(invocation_id or f"inv-{next(self.ids)}", self.epoch if epoch is None else epoch,
                                      component_id, task, inputs, knobs or {}, timeout_s))

    def report(self, component_id: str) -> ComponentReport | None:
        assert self.agent is not None
        return next((r for r in self.agent.components.reports() if r.component_id == component_id), None)

    def state(self, component_id: str) -> str | None:
        report = self.report(component_id)
        return report.state if report else None

    async def wait_state(self, component_id: str, state: str, timeout_s: float = 10.0) -> None:
        await wait_until(lambda: self.state(component_id) == state, timeout_s, f"{component_id} {state}")

    def last_report(self, component_id: str) -> tuple[ComponentReport | None, Heartbeat | None]:
        for heartbeat in reversed(self.heartbeats):
            for report in heartbeat.components:
                if report.component_id == component_id:
                    return report, heartbeat
        return None, None


@contextlib.asynccontextmanager
async def agent_link(tmp_path: Path, gpus: int = 2, *, drop_privileges: bool = False,
                     engine_python: str = "") -> AsyncIterator[Link]:
    """A real Agent with idle simulated GPUs, registered with a Link over loopback ZeroMQ.

    Tools run as the agent's user (engine_user "root") unless ``drop_privileges``: these tests
    run this module's functions in the agent's own threads (``CALLS``) and import tools from
    ``tmp_path``, which an engine account could not reach. Engine accounts: test_engine_privileges.py.
    """
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    configure_socket(sock, router=True)
    sock.bind("tcp://127.0.0.1:*")
    address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    endpoint = RpcEndpoint(sock, router=True, name="test controller")
    link = Link(endpoint)
    endpoint.dispatch = build_dispatch("controller.agents", {Register: link.on_register, Heartbeat: link.on_heartbeat})
    serving = asyncio.create_task(endpoint.serve())
    settings = AgentSettings(node_name="node-0", controller=address, state_dir=tmp_path / "node-0",
                             heartbeat_interval_s=0.1, sample_interval_s=0.05, request_timeout_s=0.5,
                             reconnect_base_s=0.05, reconnect_cap_s=0.5, metrics_enabled=False, shutdown_drain_s=1.0,
                             insecure=True,  # the test controller is a plain ROUTER
                             engine_python=engine_python, engine_user="" if drop_privileges else "root")
    devices = open_sim_devices(node_name="node-0", model="h100", count=gpus, seed=0, start_s=time.monotonic())
    link.agent = Agent(settings, devices, ctx=ctx)
    stop = asyncio.Event()
    running = asyncio.create_task(link.agent.run(stop))
    try:
        await wait_until(lambda: link.registered and bool(link.heartbeats), 10.0, "agent registered")
        yield link
    finally:
        stop.set()
        await asyncio.wait_for(running, 30.0)
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        endpoint.close()
        ctx.destroy(linger=0)


def test_tool_and_sim_components_serve_invocations(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with agent_link(tmp_path, gpus=2) as link:
            gpu0 = link.agent.devices[0]
            started = await link.start("tool-1", tool_executor("echo", f"{__name__}:echo"))
            assert started.ok and "starting" in started.message, started
            replay = await link.start("sim-1", sim_executor("sim-embed"), (0,), command_id="s-1")
            assert replay.ok
            assert await link.start("other", sim_executor("sim-embed"), (0,), command_id="s-1") == replay
            await link.wait_state("tool-1", "ready")
            await link.wait_state("sim-1", "ready")
            assert gpu0.memory_used_bytes == 10 * GIB
            again = await link.start("tool-1", tool_executor("echo", f"{__name__}:echo"))
            assert again.ok and "already ready" in again.message

            # A tool: no devices here, so no energy.
            result = await link.invoke("tool-1", "chat", {"question": "hello"})
            assert result.ok, result
            assert result.outputs == {"answer": "echo: hello"}
            assert result.energy_j is None and not result.simulated and result.device_indexes == ()
            assert result.latency_s >= 0 and result.ended_at_unix_s >= result.started_at_unix_s

            # A sim engine: typed, labeled outputs; its GPU works while it runs, and the energy shows it.
            before_j = gpu0.sample(time.monotonic()).energy_j
            call = asyncio.ensure_future(link.invoke("sim-1", "embed", {"text": "what is murakkab?"}))
            await wait_until(lambda: gpu0.utilization == 0.9, 2.0, "sim GPU busy")
            result = await call
            assert result.ok and result.simulated and result.device_indexes == (0,)
            assert len(result.outputs["embedding"]) == VECTOR_DIM
            assert check_value("vector", result.outputs["embedding"]) is None
            assert 0.2 <= result.latency_s < 1.0
            spent_j = gpu0.sample(time.monotonic()).energy_j - before_j
            assert result.energy_j is not None and 0.2 * 100 < result.energy_j <= spent_j
            assert gpu0.utilization == 0.0  # idle again
            assert link.agent.devices[1].utilization == 0.0  # the other GPU never worked

            # Idempotent invocation ids: a repeat while running joins the call; after it, the result replays.
            first, second = await asyncio.gather(
                link.invoke("tool-1", "chat", {"question": "once"}, {"delay_ms": 300}, invocation_id="same"),
                link.invoke("tool-1", "chat", {"question": "once"}, {"delay_ms": 300}, invocation_id="same"))
            third = await link.invoke("tool-1", "chat", {"question": "once"}, invocation_id="same")
            assert first == second == third and first.ok
            assert CALLS["once"] == 1

            # Refusals.
            stale = await link.invoke("tool-1", "chat", {"question": "x"}, epoch=link.epoch - 1)
            assert stale.error_code == "stale_command" and not stale.ok and stale.retryable  # a controller restarted: retry after it re-registers
            with pytest.raises(RemoteError) as refused:
                await link.call(StartComponent("c-stale", link.epoch + 1, link.generation,
                                               "tool-9", tool_executor("echo", f"{__name__}:echo"), ()))
            assert refused.value.code == "stale_command"
            with pytest.raises(RemoteError):
                await link.call(StopComponent("c-stale-2", link.epoch, link.generation - 1,
                                              "tool-1", 1.0))
            missing = await link.invoke("tool-1", "chat", {"context": ["x"]})
            assert missing.error_code == "invalid_input" and "needs input 'question'" in missing.error
            assert not missing.retryable
            wrong = await link.invoke("tool-1", "chat", {"question": 7})
            assert wrong.error_code == "invalid_input" and "inputs.question: expected text" in wrong.error
            knob = await link.invoke("tool-1", "chat", {"question": "x"}, {"delay_ms": 5})
            assert knob.error_code == "invalid_input" and "delay_ms=5" in knob.error
            task = await link.invoke("tool-1", "embed", {"text": "x"})
            assert task.error_code == "invalid_input" and "not 'embed'" in task.error
            nowhere = await link.invoke("no-such", "chat", {"question": "x"})
            assert nowhere.error_code == "component_unavailable" and nowhere.retryable
            bad_spec = await link.start("bad", {"name": "Bad Name", "task": "chat", "engine": "tool"})
            assert not bad_spec.ok and "invalid executor spec" in bad_spec.message and "name" in bad_spec.message
            no_device = await link.start("sim-9", sim_executor("sim-embed"), (7,))
            assert not no_device.ok and "no device(s) [7]" in no_device.message
            clash = await link.start("tool-1", sim_executor("sim-embed"), (1,))
            assert not clash.ok and "stop it before" in clash.message

            # Tool errors and wrong engine outputs.
            await link.start("refuse", tool_executor("refuse", f"{__name__}:refuse"))
            await link.start("buggy", tool_executor("buggy", f"{__name__}:buggy"))
            await link.wait_state("refuse", "ready")
            await link.wait_state("buggy", "ready")
            result = await link.invoke("refuse", "chat", {"question": ""})
            assert (result.error_code, result.error, result.retryable) == (
                "tool_error", "question must not be empty", False)
            result = await link.invoke("buggy", "chat", {"question": "x"})
            assert result.error_code == "engine_failed" and "outputs.answer: expected text" in result.error

            # Everything shows up in heartbeats.
            await wait_until(lambda: link.last_report("buggy")[0] is not None, 2.0, "heartbeat with components")
            report, heartbeat = link.last_report("sim-1")
            assert report.state == "ready" and report.simulated and report.device_indexes == (0,)
            assert report.executor == "sim-embed" and report.restarts == 0
            assert heartbeat.running_components == 4
            log_path = tmp_path / "node-0" / "components" / "sim-1" / "engine.log"
            assert "starting -> ready" in log_path.read_text()
        # Agent shutdown stops every component and gives the sim GPU back.
        assert {r.state for r in link.agent.components.reports()} == {"stopped"}
        assert gpu0.memory_used_bytes == 0
        assert "stopped" in log_path.read_text().splitlines()[-1]

    asyncio.run(scenario())


def test_concurrency_is_bounded_and_the_queue_too(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with agent_link(tmp_path, gpus=1) as link:
            await link.start("one", tool_executor("echo", f"{__name__}:echo", max_concurrency=1))
            await link.wait_state("one", "ready")
            manager = link.agent.components
            manager.components["one"].max_waiting = 2
            t0 = time.monotonic()
            results = await asyncio.gather(*(link.invoke("one", "chat", {"question": f"q{i}"}, {"delay_ms": 100})
                                             for i in range(5)))
            codes = sorted(r.error_code for r in results)
            assert codes == ["", "", "", "component_unavailable", "component_unavailable"], [(r.error_code, r.error, r.latency_s) for r in results]
            assert "at capacity" in next(r.error for r in results if r.error_code)
            assert time.monotonic() - t0 >= 0.3  # the three accepted ones ran one at a time
            slow = await link.invoke("one", "chat", {"question": "late"}, {"delay_ms": 300}, timeout_s=0.1)
            assert slow.error_code == "timeout" and not slow.ok and "cannot be killed" in slow.error

    asyncio.run(scenario())


def test_stop_drains_then_stops_and_drain_timeout_fails_leftovers(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with agent_link(tmp_path, gpus=2) as link:
            await link.start("sim-a", sim_executor("sim-chat", latency_s=0.8, task="chat"), (0,))
            await link.start("sim-b", sim_executor("sim-chat", latency_s=3.0, task="chat"), (1,))
            await link.wait_state("sim-a", "ready")
            await link.wait_state("sim-b", "ready")

            call = asyncio.ensure_future(link.invoke("sim-a", "chat", {"question": "drain me"}))
            await wait_until(lambda: link.agent.devices[0].utilization > 0, 2.0, "sim-a busy")
            stopping = await link.stop("sim-a", drain_timeout_s=5.0)
            assert stopping.ok and "draining" in stopping.message
            refused = await link.invoke("sim-a", "chat", {"question": "too late"})
            assert refused.error_code == "component_unavailable" and "draining" in refused.error
            result = await call
            assert result.ok and result.outputs["answer"].startswith("[simulated answer by sim-chat]")
            await link.wait_state("sim-a", "stopped", 2.0)
            assert link.agent.devices[0].memory_used_bytes == 0 and link.agent.devices[0].utilization == 0.0

            call = asyncio.ensure_future(link.invoke("sim-b", "chat", {"question": "slow"}))
            await wait_until(lambda: link.agent.devices[1].utilization > 0, 2.0, "sim-b busy")
            t0 = time.monotonic()
            await link.stop("sim-b", drain_timeout_s=0.3)
            result = await call
            assert time.monotonic() - t0 < 2.0
            assert result.error_code == "engine_failed" and result.retryable and "drain timeout" in result.error
            assert result.energy_j is not None and result.energy_j > 0
            await link.wait_state("sim-b", "stopped", 2.0)
            # Stopping is idempotent; a start after a stop is a restart.
            assert (await link.stop("sim-b")).ok
            assert (await link.stop("never-started")).ok
            await link.start("sim-b", sim_executor("sim-chat", latency_s=3.0, task="chat"), (1,))
            await link.wait_state("sim-b", "ready")
            assert next(r for r in link.agent.components.reports() if r.component_id == "sim-b").restarts == 1

    asyncio.run(scenario())


def test_cancel_stops_a_running_or_waiting_invocation_and_frees_its_slot(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with agent_link(tmp_path, gpus=1) as link:
            one_slot = {**sim_executor("sim-chat", latency_s=3.0, task="chat")}
            one_slot["sim"] = {**one_slot["sim"], "max_concurrency": 1}
            await link.start("solo", one_slot, (0,))
            await link.wait_state("solo", "ready")
            running = asyncio.ensure_future(link.invoke("solo", "chat", {"question": "a"}, invocation_id="run-1"))
            await wait_until(lambda: link.agent.devices[0].utilization > 0, 2.0, "the first invocation running")
            waiting = asyncio.ensure_future(link.invoke("solo", "chat", {"question": "b"}, invocation_id="wait-1"))
            await asyncio.sleep(0.2)  # queued behind the first: one slot
            t0 = time.monotonic()
            answer = await link.cancel("wait-1", "job j-2 cancelled")
            assert answer.ok and "before it started" in answer.message
            queued = await waiting
            assert queued.error_code == "cancelled" and not queued.retryable and "job j-2 cancelled" in queued.error
            answer = await link.cancel("run-1", "job j-1 cancelled")
            assert answer.ok and "stopped on solo" in answer.message
            stopped = await running
            assert time.monotonic() - t0 < 1.5  # not the 3 s the engine would take
            assert stopped.error_code == "cancelled" and not stopped.retryable and "job j-1 cancelled" in stopped.error
            assert stopped.energy_j is not None  # the energy it did use is still measured
            # The slot is free at once: a new invocation starts (and would finish) without waiting.
            fresh = asyncio.ensure_future(link.invoke("solo", "chat", {"question": "c"}, invocation_id="run-2"))
            await wait_until(lambda: link.agent.devices[0].utilization > 0, 1.0, "the next invocation running")
            # Cancelling what is not running is not an error; a stale epoch is refused.
            assert "not running here" in (await link.cancel("never-seen")).message
            with pytest.raises(RemoteError, match="stale_command"):
                await link.cancel("run-2", epoch=EPOCH - 1)
            assert (await fresh).ok  # the stale cancel changed nothing

    asyncio.run(scenario())


def test_engine_crashes_are_reported_failed_in_the_next_heartbeat(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    tools_dir = tmp_path / "tools"
    tools_dir.mkdir()
    (tools_dir / "child_tools.py").write_text(CHILD_TOOLS)
    monkeypatch.setenv("PYTHONPATH", str(tools_dir))

    async def scenario() -> None:
        async with agent_link(tmp_path, gpus=1) as link:
            await link.start("child", tool_executor("child", "child_tools:answer", isolation="subprocess"))
            await link.start("crashy", tool_executor("crashy", "child_tools:crash", isolation="subprocess"))
            await link.start("hangs", tool_executor("hangs", "child_tools:hang", isolation="subprocess"))
            await link.start("sim", sim_executor("sim-embed"), (0,))
            await link.start("broken", tool_executor("broken", "no_such_module:fn"))
            for cid in ("child", "crashy", "hangs", "sim"):
                await link.wait_state(cid, "ready", 20.0)
            await link.wait_state("broken", "failed")
            broken = next(r for r in link.agent.components.reports() if r.component_id == "broken")
            assert "cannot import tool no_such_module:fn" in broken.reason and "No module named" in broken.reason

            result = await link.invoke("child", "chat", {"question": "hi"})
            assert result.ok and result.outputs == {"answer": "[from a child process] hi"}, result
            child_log = tmp_path / "node-0" / "components" / "child" / "engine.log"
            assert "a print goes to the component log" in child_log.read_text()

            t0 = time.monotonic()
            result = await link.invoke("hangs", "chat", {"question": "x"}, timeout_s=0.5)
            assert result.error_code == "timeout" and time.monotonic() - t0 < 3.0
            assert link.state("hangs") == "ready"

            result = await link.invoke("crashy", "chat", {"question": "boom"})
            assert result.error_code == "engine_failed" and result.retryable and "code -9" in result.error
            # The agent notices the exit when its watcher runs; heartbeats go out every 0.1 s, so on a busy
            # 2-core machine that is a few heartbeats later rather than the very next one.
            await wait_until(lambda: (link.last_report("crashy")[0] or None) is not None
                             and link.last_report("crashy")[0].state == "failed", 3.0, "crashy failed in a heartbeat")
            report, _ = link.last_report("crashy")
            log_path = tmp_path / "node-0" / "components" / "crashy" / "engine.log"
            assert report.reason == f"engine exited with code -9 (see log {log_path})"
            assert "without replying" in log_path.read_text()

            engine = link.agent.components.components["sim"].engine
            assert isinstance(engine, SimEngine)
            call = asyncio.ensure_future(link.invoke("sim", "embed", {"text": "in flight"}))
            await asyncio.sleep(0.05)
            engine.kill()
            t_kill = time.monotonic()
            result = await call
            assert result.error_code == "engine_failed" and result.retryable and "exited with code -9" in result.error
            await wait_until(lambda: (link.last_report("sim")[0] or None) is not None
                             and link.last_report("sim")[0].state == "failed", 2.0, "sim failed in a heartbeat")
            assert time.monotonic() - t_kill < 1.5

            # The controller restarts what failed.
            restarted = await link.start("crashy", tool_executor("crashy", "child_tools:crash", isolation="subprocess"))
            assert restarted.ok and "starting" in restarted.message
            await link.wait_state("crashy", "ready", 20.0)
            assert next(r for r in link.agent.components.reports() if r.component_id == "crashy").restarts == 1

    asyncio.run(scenario())


# --- sim engines and outputs, without a cluster ----------------------------------------------


def sample_inputs(task: str, rng: random.Random) -> dict[str, Any]:
    """Valid inputs for any task, built from its declared types."""
    examples = {
        "text": "a question", "vector": [0.1, 0.2, 0.3], "file": {"name": "c.jsonl", "media_type": "x", "data": b"{}"},
        "video": {"name": "v.mp4", "media_type": "video/mp4", "data": b"\x00"},
        "image": {"name": "f.png", "media_type": "image/png", "data": b"\x89PNG"},
        "document": {"id": "d1", "text": "doc"}, "scene": {"index": 0, "start_s": 0.0, "end_s": 1.0},
        "test_result": {"passed": True, "passed_tests": 2, "total_tests": 2, "error": "", "runtime_s": 0.1},
    }
    inputs = {}
    for name, spec in TASKS[task].inputs.items():
        el = element_type(spec.type)
        if el is not None:
            inputs[name] = [examples[el] if el != "document" else {"id": f"d{i}", "text": f"doc {i}"}
                            for i in range(rng.randrange(1, 5))]
        else:
            inputs[name] = examples[spec.type]
        assert check_value(spec.type, inputs[name]) is None
    return inputs


@pytest.mark.parametrize("task", sorted(TASKS))
def test_simulated_outputs_are_typed_deterministic_and_labeled(task: str) -> None:
    inputs = sample_inputs(task, random.Random(task))
    knobs = {"frames": 4, "top_k": 2, "debaters": 3}
    outputs = simulated_outputs(task, "sim-x", inputs, knobs)
    assert set(outputs) == set(TASKS[task].outputs)
    for name, type_expr in TASKS[task].outputs.items():
        assert check_value(type_expr, outputs[name], name) is None
    assert simulated_outputs(task, "sim-x", inputs, knobs) == outputs
    texts = [v for v in outputs.values() if isinstance(v, str)]
    texts += [t for v in outputs.values() if isinstance(v, list) for t in v if isinstance(t, str)]
    for text in texts:
        if task not in ("rank-candidates", "retrieve"):  # these pass input texts through (best candidate, passages)
            assert "[simulated" in text, (task, text)


def test_simulated_outputs_follow_their_inputs() -> None:
    docs = [{"id": f"d{i}", "text": f"doc {i}"} for i in range(5)]
    out = simulated_outputs("retrieve", "sim", {"query": [1.0], "embeddings": [[1.0]] * 5, "documents": docs},
                            {"top_k": 3})
    scores = [p["score"] for p in out["passages"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert {p["id"] for p in out["passages"]} <= {d["id"] for d in docs}
    assert out["texts"] == [next(d["text"] for d in docs if d["id"] == p["id"]) for p in out["passages"]]
    assert len(simulated_outputs("frame-extraction", "sim", {"video": {}, "scenes": []}, {"frames": 6})["frames"]) == 6
    ranked = simulated_outputs("rank-candidates", "sim", {"candidates": ["a", "b"], "results": [
        {"passed": False, "passed_tests": 1, "total_tests": 3, "error": "x", "runtime_s": 0.1},
        {"passed": True, "passed_tests": 3, "total_tests": 3, "error": "", "runtime_s": 0.1}]}, {})
    assert ranked["best"] == "b" and [r["index"] for r in ranked["ranking"]] == [1, 0]
    assert simulated_outputs("embed", "e", {"text": "x"}, {}) != simulated_outputs("embed", "e", {"text": "y"}, {})


def sim_context(tmp_path: Path, devices: list, **sim: Any) -> EngineContext:
    executor = ExecutorSpec.model_validate({
        "name": "sim-llm", "task": "chat", "engine": "sim",
        "sim": {"latency_s": 1.0, "latency_per_item_s": 0.5, "utilization": 1.0, "startup_s": 2.0,
                "knob_latency_factors": {"max_tokens": {"128": 1.0, "512": 3.0}}, **sim},
        "knobs": {"max_tokens": {"values": [128, 512], "default": 128}}})
    return EngineContext("c", executor, devices, tmp_path / "engine.log", tmp_path)


def test_sim_latency_model_knobs_items_and_power_caps(tmp_path: Path) -> None:
    now = [0.0]
    gpu = open_sim_devices(node_name="n", model="h100", count=1, seed=1)[0]
    engine = SimEngine(sim_context(tmp_path, [gpu]), clock=lambda: now[0])
    asyncio.run(engine.start())
    assert not asyncio.run(engine.probe())
    now[0] = 2.0
    assert asyncio.run(engine.probe())
    base_s = engine.latency_s({"question": "q"}, {"max_tokens": 128})
    assert base_s == pytest.approx(1.0)
    assert engine.latency_s({"question": "q", "context": ["a", "b"]}, {"max_tokens": 512}) == pytest.approx(6.0)
    gpu.set_power_limit(200.0)
    capped_s = engine.latency_s({"question": "q"}, {"max_tokens": 128})
    assert capped_s > 1.2 * base_s  # a capped GPU runs at a lower clock, so the same work takes longer


def test_sim_engine_needs_simulated_gpus_and_their_memory(tmp_path: Path) -> None:
    cpu = CpuDevice(0, tdp_w=65.0, idle_w=10.0, start_s=0.0, utilization_reader=lambda: 0.0)
    with pytest.raises(EngineError, match=r"simulated GPUs only, but was given device 0 \(cpu, backend cpu\)"):
        asyncio.run(SimEngine(sim_context(tmp_path, [cpu])).start())
    gpu = open_sim_devices(node_name="n", model="h100", count=1, seed=1)[0]
    with pytest.raises(EngineError, match="which has .* free"):
        asyncio.run(SimEngine(sim_context(tmp_path, [gpu], memory_bytes=gpu.info.memory_total_bytes + 1)).start())
    engine = SimEngine(sim_context(tmp_path, [gpu], memory_bytes=GIB))
    asyncio.run(engine.start())
    assert gpu.memory_used_bytes == GIB
    gpu.fall_off_bus()
    assert engine.exit_code() == 1
    assert "fell off the bus" in (tmp_path / "engine.log").read_text()


def test_sim_engines_share_a_gpu_and_restore_its_load(tmp_path: Path) -> None:
    async def scenario() -> None:
        gpu = open_sim_devices(node_name="n", model="h100", count=1, seed=1, utilization=0.3,
                               start_s=time.monotonic())[0]
        # Latencies far above scheduling delays on a loaded machine; checks poll instead of sleeping.
        a = SimEngine(sim_context(tmp_path, [gpu], latency_s=3.0, latency_per_item_s=0.0, utilization=0.5,
                                  startup_s=0.0))
        b = SimEngine(sim_context(tmp_path, [gpu], latency_s=1.0, latency_per_item_s=0.0, utilization=0.4,
                                  startup_s=0.0))
        await a.start()
        await b.start()

        async def until(condition: Callable[[], bool], what: str) -> None:
            deadline = time.monotonic() + 2.0
            while not condition():
                assert time.monotonic() < deadline, what
                await asyncio.sleep(0.01)

        first = asyncio.ensure_future(a.invoke("chat", {"question": "q"}, {}, 10.0))
        await until(lambda: gpu.utilization == 0.5, "a's load applied")
        second = asyncio.ensure_future(b.invoke("chat", {"question": "q"}, {}, 10.0))
        await until(lambda: gpu.utilization == pytest.approx(0.9), "both loads applied")
        await second
        assert not first.done() and gpu.utilization == 0.5
        out = await first
        assert gpu.utilization == 0.3  # back to the GPU's own background load
        assert out["answer"].startswith("[simulated answer by sim-llm]")
        with pytest.raises(EngineError) as timed_out:
            await a.invoke("chat", {"question": "q"}, {}, 0.05)
        assert timed_out.value.code == "timeout" and gpu.utilization == 0.3
        await a.stop(1.0)
        with pytest.raises(EngineError, match="not running"):
            await a.invoke("chat", {"question": "q"}, {}, 1.0)

    asyncio.run(scenario())
