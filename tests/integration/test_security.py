"""The authenticated control plane on real sockets: CurveZMQ, the ZAP handler, node binding, roles, revocation.

Each case of the matrix has its expected outcome: an enrolled agent registers; an unknown key,
a plaintext client and a client that encrypts to the wrong server key are refused at the
handshake and counted by reason; a revoked key is refused, and revoking a connected one
disconnects it; a node key cannot speak as another node; every admin role meets every
admin request kind and is refused exactly where its role says, with a ``forbidden`` error
naming the role needed; a submitter sees and cancels only its own jobs.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from agent.config import AgentSettings
from agent.daemon import Agent
from agent.devices.sim import open_sim_devices
from common.protocol import (
    ApplyCatalog, ApplyWorkflow, CancelJob, DeleteWorkflow, DrainNode, ErrorReply, GetJob, GetNode, GetPlan,
    GetPowerBudget, GetProfileRun, GetStatus, GetWorkflow, Heartbeat, HostInfo, HostTelemetry, InjectDeviceFault, LabelNode,
    ListComponents, ListEvents, ListExecutors, ListJobs, ListNodes, ListProfiles, ListWorkflows, Register,
    SetNodePowerLimit, SetPowerBudget, StartProfile, SubmitJob, UndrainNode, UnpinPowerLimit, decode, encode,
)
from common.security.curve import ClientCredentials, new_key_pair, write_key_files
from controller.cli.client import AdminClient, ClientError
from controller.security.keyring import ROLES, Keyring
from controller.security.roles import ALLOWED_OPS, unclassified_ops
from tests.integration.cluster import FAST, InProcessCluster, in_process_cluster, wait_until
from tests.keys import curve_dealer

ROOT = Path(__file__).resolve().parents[2]
CHAT_WORKFLOW = (ROOT / "examples" / "workflows" / "chat.yaml").read_text()


def refusals(cluster: InProcessCluster) -> dict[tuple[str, str], float]:
    counts: dict[tuple[str, str], float] = {}
    for metric in cluster.controller.metrics.auth_refused.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                counts[(sample.labels["endpoint"], sample.labels["reason"])] = sample.value
    return counts


def call(cluster: InProcessCluster, msg: Any, credentials: ClientCredentials | None, timeout_s: float = 5.0) -> Any:
    with AdminClient(cluster.admin_address, timeout_s, credentials) as client:
        return client.call(msg)


async def acall(cluster: InProcessCluster, msg: Any, credentials: ClientCredentials | None,
                timeout_s: float = 5.0) -> Any:
    return await asyncio.to_thread(call, cluster, msg, credentials, timeout_s)


async def error_of(cluster: InProcessCluster, msg: Any, credentials: ClientCredentials | None,
                   timeout_s: float = 5.0) -> str:
    try:
        reply = await acall(cluster, msg, credentials, timeout_s)
    except ClientError as exc:
        return str(exc)
    raise AssertionError(f"{type(msg).__name__} was accepted: {reply}")


def stray_key(tmp_path: Path, name: str) -> Path:
    """A key pair the controller's keyring has never seen."""
    _, secret = write_key_files(tmp_path / "stray", name, new_key_pair())
    return secret


def start_agent(tmp_path: Path, cluster: InProcessCluster, name: str, **keys: Any) -> tuple[Agent, asyncio.Event,
                                                                                          asyncio.Task[None]]:
    settings = AgentSettings(
        node_name=name, controller=cluster.controller.agent_endpoint, state_dir=tmp_path / name,
        heartbeat_interval_s=FAST["heartbeat_interval_s"], sample_interval_s=0.05, request_timeout_s=0.3,
        reconnect_base_s=0.05, reconnect_cap_s=0.3, metrics_enabled=False, **keys)
    devices = open_sim_devices(node_name=name, model="l4", count=1, seed=3, start_s=time.monotonic())
    agent = Agent(settings, devices)
    stop = asyncio.Event()
    return agent, stop, asyncio.create_task(agent.run(stop))


async def stop_agent(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    stop.set()
    await asyncio.wait_for(task, 10)


# --- the handshake matrix ----------------------------------------------------------------


def test_enrolled_agent_registers_and_strangers_are_refused_at_the_handshake(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=1) as cluster:
            keys = cluster.keys
            assert keys is not None
            assert cluster.controller.registry.nodes["node-0"].state == "ready"  # enrolled: registered over CURVE

            # An unknown key: the agent runs, but the controller never hears it.
            agent, stop, task = start_agent(tmp_path, cluster, "intruder", key_file=stray_key(tmp_path, "intruder"),
                                            controller_key_file=keys.server_public)
            await wait_until(lambda: refusals(cluster).get(("agents", "unknown_key"), 0) >= 2, what="unknown key")
            assert "intruder" not in cluster.controller.registry.nodes and not task.done()
            await wait_until(lambda: bool(agent._why_no_reply() or agent._explained), what="the agent's diagnosis")
            assert "refused the client key key_file" in (agent._explained or "")
            await stop_agent(stop, task)

            # A plaintext agent (insecure = true) against the CURVE controller.
            agent, stop, task = start_agent(tmp_path, cluster, "plain", insecure=True)
            await wait_until(lambda: refusals(cluster).get(("agents", "no_curve"), 0) >= 1, what="plaintext")
            assert "plain" not in cluster.controller.registry.nodes
            await stop_agent(stop, task)

            # An enrolled key that encrypts to another server key: the controller cannot open its hello.
            keys.add_node("misled")
            cluster.controller.auth.reload_if_changed()
            wrong_server = tmp_path / "wrong-server"
            write_key_files(wrong_server, "controller", new_key_pair())
            agent, stop, task = start_agent(tmp_path, cluster, "misled", key_file=keys.nodes["misled"],
                                            controller_key_file=wrong_server / "controller.key")
            await wait_until(lambda: refusals(cluster).get(("agents", "bad_handshake"), 0) >= 1, what="bad key")
            assert "misled" not in cluster.controller.registry.nodes
            await stop_agent(stop, task)

            # A user key is not a node key: refused on the agent socket; a node key on the admin socket likewise.
            sock = curve_dealer(zmq.asyncio.Context.instance(), cluster.controller.agent_endpoint, b"admin",
                                keys.user("admin"))
            await sock.send(encode(_heartbeat("admin"), 1))
            assert not await sock.poll(500)
            sock.close(0)
            assert refusals(cluster).get(("agents", "wrong_kind"), 0) >= 1
            with pytest.raises(ClientError, match="refused the client key"):
                await acall(cluster, GetStatus(), keys.node("node-0"), timeout_s=1.0)
            assert refusals(cluster).get(("admin", "wrong_kind"), 0) >= 1
            assert cluster.controller.registry.nodes["node-0"].state == "ready"  # the enrolled agent is unharmed

    asyncio.run(scenario())


def _heartbeat(node: str) -> Heartbeat:
    return Heartbeat(node_name=node, generation=1, seq=1, sent_at_unix_s=time.time(), devices=(),
                     host=HostTelemetry(cpu_utilization_pct=0.0, memory_used_bytes=0, memory_total_bytes=1,
                                        load_avg_1m=0.0))


def test_a_node_key_speaks_only_as_its_own_node(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=2, gpus=1) as cluster:
            keys, controller = cluster.keys, cluster.controller
            assert keys is not None and controller.auth is not None
            generation = controller.registry.nodes["node-1"].generation
            ctx = zmq.asyncio.Context()
            # node-0's key under node-1's socket identity while node-1 is connected: no takeover, no reply.
            hijack = curve_dealer(ctx, controller.agent_endpoint, b"node-1", keys.node("node-0"))
            await hijack.send(encode(_heartbeat("node-1"), 1))
            assert not await hijack.poll(800)
            hijack.close(0)
            await asyncio.sleep(3 * FAST["heartbeat_interval_s"])
            node1 = controller.registry.nodes["node-1"]
            assert node1.state == "ready" and node1.generation == generation

            # Without a key (plaintext) under node-1's identity: the handshake fails, nothing reaches node-1.
            plain = curve_dealer(ctx, controller.agent_endpoint, b"node-1", None)
            await plain.send(encode(_heartbeat("node-1"), 1))
            assert not await plain.poll(500)
            plain.close(0)
            assert refusals(cluster).get(("agents", "no_curve"), 0) >= 1
            assert controller.registry.nodes["node-1"].state == "ready"

            # An enrolled node-x under its own identity, registering as node-1: refused by name.
            keys.add_node("node-x")
            assert controller.auth.reload_if_changed()
            own = curve_dealer(ctx, controller.agent_endpoint, b"node-x", keys.node("node-x"))
            register = Register(node_name="node-1", hostname="h", generation=99, agent_version="x", devices=(),
                                host=HostInfo(cpu_count=1, memory_total_bytes=1, os="linux", python_version="3"))
            await own.send(encode(register, 2))
            reply = decode(await asyncio.wait_for(own.recv(), 3)).message
            assert isinstance(reply, ErrorReply) and reply.code == "identity_mismatch"
            own.close(0)

            # node-1 gone; node-0's key takes the free identity node-1: refused, counted and disconnected.
            await cluster.stop_agent("node-1")
            reply = None
            for _ in range(10):  # until the controller has let go of node-1's closed connection
                squat = curve_dealer(ctx, controller.agent_endpoint, b"node-1", keys.node("node-0"))
                await squat.send(encode(_heartbeat("node-1"), 3))
                if await squat.poll(500):
                    reply = decode(await squat.recv()).message
                squat.close(0)
                if reply is not None:
                    break
            assert isinstance(reply, ErrorReply) and reply.code == "identity_mismatch"
            assert refusals(cluster).get(("agents", "identity_mismatch"), 0) >= 1
            ctx.destroy(linger=0)
            assert controller.registry.nodes["node-1"].generation == generation  # never re-registered by node-0
            assert controller.registry.nodes["node-0"].state == "ready"

    asyncio.run(scenario())


def test_revocation_refuses_new_handshakes_and_disconnects_live_peers(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=2, gpus=1) as cluster:
            keys, controller = cluster.keys, cluster.controller
            assert keys is not None
            keyring = Keyring.load(keys.keys_dir)
            keyring.revoke("node-1")  # while connected: the controller notices the file within a second
            await wait_until(lambda: controller.registry.nodes["node-1"].state in ("suspect", "lost"), 10.0,
                             "node-1 to go silent after its key was revoked")
            assert refusals(cluster).get(("agents", "revoked"), 0) >= 1  # its reconnects are refused
            await asyncio.sleep(1.0)
            assert controller.registry.nodes["node-1"].state != "ready"
            assert controller.registry.nodes["node-0"].state == "ready"

            keys.add_user("bob", "viewer")
            await wait_until(lambda: "bob" in {e.name for e in controller.auth.keyring.entries}, 5.0, "bob issued")
            bob = keys.user("bob")
            # bob connected and served; then revoked: the same connection is cut and refused.
            with AdminClient(cluster.admin_address, 2.0, bob) as client:
                assert (await asyncio.to_thread(client.call, GetStatus())).nodes_by_state
                Keyring.load(keys.keys_dir).revoke("bob")
                await asyncio.sleep(0.6)
                with pytest.raises(ClientError, match="refused the client key|unauthenticated"):
                    await asyncio.to_thread(client.call, GetStatus())
            assert refusals(cluster).get(("admin", "revoked"), 0) >= 1

    asyncio.run(scenario())


# --- roles on the admin socket -----------------------------------------------------------


def sample_requests() -> dict[str, Any]:
    """One request of every kind the admin socket serves, aimed at targets that do not exist where
    carrying it out would change the cluster, so the outcome shows the authorization alone."""
    return {
        "list_nodes": ListNodes(), "get_node": GetNode("node-0"), "get_status": GetStatus(),
        "get_power_budget": GetPowerBudget(), "list_events": ListEvents(), "list_executors": ListExecutors(),
        "list_workflows": ListWorkflows(), "get_workflow": GetWorkflow("no-such-workflow"),
        "list_components": ListComponents(), "get_plan": GetPlan(), "get_profile_run": GetProfileRun("no-such-run"),
        "list_profiles": ListProfiles(), "list_jobs": ListJobs(), "get_job": GetJob("j-none"),
        "drain_node": DrainNode("no-such-node", "test"), "undrain_node": UndrainNode("no-such-node"),
        "label_node": LabelNode("no-such-node", {"a": "b"}),
        "set_node_power_limit": SetNodePowerLimit("no-such-node", 0, 200.0),
        "unpin_power_limit": UnpinPowerLimit("no-such-node", 0),
        "set_power_budget": SetPowerBudget("no-such-rack", None),
        "apply_catalog": ApplyCatalog("bad.yaml", "not: [a catalog"),
        "apply_workflow": ApplyWorkflow("bad.yaml", "not: [a workflow"),
        "delete_workflow": DeleteWorkflow("no-such-workflow"),
        "submit_job": SubmitJob("no-such-workflow", {}), "cancel_job": CancelJob("j-none"),
        "start_profile": StartProfile("no-such-executor", "no-such-node", 0),
        "inject_device_fault": InjectDeviceFault("no-such-node", 0, "xid"),
    }


def test_every_role_against_every_admin_request(tmp_path: Path) -> None:
    assert unclassified_ops() == set()
    requests = sample_requests()
    assert set(requests) == set().union(*ALLOWED_OPS.values())

    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=1) as cluster:
            keys = cluster.keys
            assert keys is not None
            for role in ROLES:
                keys.add_user(f"as-{role}", role)
            cluster.controller.auth.reload_if_changed()
            outcomes: dict[tuple[str, str], str] = {}
            for role in ROLES:
                creds = keys.user(f"as-{role}")
                with AdminClient(cluster.admin_address, 5.0, creds) as client:
                    for op, msg in requests.items():
                        try:
                            await asyncio.to_thread(client.call, msg)
                            outcomes[(role, op)] = "ok"
                        except ClientError as exc:
                            outcomes[(role, op)] = str(exc)
            for (role, op), outcome in outcomes.items():
                allowed = op in ALLOWED_OPS[role]
                if allowed:
                    assert not outcome.startswith("forbidden"), (role, op, outcome)
                else:
                    assert outcome.startswith("forbidden:"), (role, op, outcome)
                    assert f"{op} needs role" in outcome and f"this key has role {role}" in outcome
            assert outcomes[("viewer", "drain_node")].startswith("forbidden: drain_node needs role admin or operator")
            assert outcomes[("operator", "inject_device_fault")] == (
                "forbidden: inject_device_fault needs role admin; this key has role operator")
            forbidden = sum(1 for (role, op) in outcomes if op not in ALLOWED_OPS[role])
            assert refusals(cluster).get(("admin", "forbidden"), 0) == forbidden

    asyncio.run(scenario())


def test_a_submitter_sees_and_cancels_only_its_own_jobs(tmp_path: Path) -> None:
    from tests.integration.test_workflow_jobs import catalog_yaml, slow_chat_executor, slow_chat_workflow

    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=2) as cluster:
            keys = cluster.keys
            assert keys is not None
            for name, role in (("app-a", "submitter"), ("app-b", "submitter"), ("watcher", "viewer")):
                keys.add_user(name, role)
            cluster.controller.auth.reload_if_changed()
            admin, a, b, watcher = (keys.user(n) for n in ("admin", "app-a", "app-b", "watcher"))
            await acall(cluster, ApplyCatalog("c.yaml", catalog_yaml([slow_chat_executor(30.0)])), admin)
            await acall(cluster, ApplyWorkflow("w.yaml", slow_chat_workflow()), admin)
            job_id = (await acall(cluster, SubmitJob("slow-chat", {"question": "hi"}, idempotency_key="k1"), a,
                                  timeout_s=30.0)).job_id
            # b's idempotency key space is its own: the same key makes b a new job, not a's.
            job_b = (await acall(cluster, SubmitJob("slow-chat", {"question": "yo"}, idempotency_key="k1"), b,
                                 timeout_s=30.0)).job_id
            assert job_b != job_id
            assert "submitted by another user" in await error_of(cluster, GetJob(job_id), b)
            assert "submitted by another user" in await error_of(cluster, CancelJob(job_id), b)
            assert [j.job_id for j in (await acall(cluster, ListJobs(), b)).jobs] == [job_b]
            assert {j.job_id for j in (await acall(cluster, ListJobs(), watcher)).jobs} == {job_id, job_b}
            assert (await acall(cluster, GetJob(job_id), watcher)).job.job_id == job_id
            assert (await error_of(cluster, CancelJob(job_id), watcher)).startswith("forbidden: cancel_job")
            assert (await acall(cluster, CancelJob(job_id, "done"), a)).job.state == "cancelled"
            assert cluster.controller.workloads.store.get_job(job_id).owner == "app-a"
            await acall(cluster, CancelJob(job_b, "done"), admin)

    asyncio.run(scenario())


# --- murakkabctl: where keys come from ----------------------------------------------------


def ctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os
    base = {k: v for k, v in os.environ.items() if not k.startswith("MURAKKAB_")}
    return subprocess.run([sys.executable, "-m", "controller.cli.main", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**base, **(env or {})})


def test_murakkabctl_says_which_key_is_missing_or_wrong_within_the_timeout(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=1) as cluster:
            keys = cluster.keys
            assert keys is not None
            address = cluster.admin_address
            env = {**keys.env(), "MURAKKAB_CONTROLLER": address}
            ok = await asyncio.to_thread(ctl, "nodes", "-o", "json", env=env)
            assert ok.returncode == 0 and '"node-0"' in ok.stdout

            def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
                lines = proc.stderr.strip().splitlines()
                assert proc.returncode == 1 and len(lines) == 1, proc.stderr
                return lines[0]

            missing = await asyncio.to_thread(ctl, "--controller", address, "nodes")
            assert "no --key FILE (or $MURAKKAB_KEY)" in one_line_error(missing)
            gone = await asyncio.to_thread(ctl, "nodes", env={**env, "MURAKKAB_KEY": str(tmp_path / "nope")})
            assert f"MURAKKAB_KEY {tmp_path / 'nope'}: no such file" in one_line_error(gone)
            public_only = await asyncio.to_thread(ctl, "nodes", env={**env, "MURAKKAB_KEY": str(keys.server_public)})
            assert "holds no secret-key" in one_line_error(public_only)

            stray = stray_key(tmp_path, "stray")
            started = time.monotonic()
            unknown = await asyncio.to_thread(ctl, "--timeout", "2", "nodes", env={**env, "MURAKKAB_KEY": str(stray)})
            assert time.monotonic() - started < 10
            line = one_line_error(unknown)
            assert "refused the client key MURAKKAB_KEY" in line and str(stray) in line

            wrong_dir = tmp_path / "other-controller"
            write_key_files(wrong_dir, "controller", new_key_pair())
            wrong = await asyncio.to_thread(ctl, "--timeout", "2", "nodes",
                                            env={**env, "MURAKKAB_SERVER_KEY": str(wrong_dir / "controller.key")})
            line = one_line_error(wrong)
            assert "CURVE handshake failed: MURAKKAB_SERVER_KEY" in line and "other-controller" in line

            plain = await asyncio.to_thread(ctl, "--timeout", "2", "--insecure", "--controller", address, "nodes")
            assert "the controller requires CURVE" in one_line_error(plain)

    asyncio.run(scenario())


def test_insecure_mode_is_plaintext_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)

    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=1, controller_settings={"insecure": True}) as cluster:
            assert cluster.keys is None and cluster.controller.auth is None
            status = await acall(cluster, GetStatus(), None)
            assert status.nodes_by_state == {"ready": 1}
            proc = await asyncio.to_thread(ctl, "--timeout", "2", "--controller", cluster.admin_address, "nodes",
                                           env={"MURAKKAB_KEY": str(stray_key(tmp_path, "k")),
                                                "MURAKKAB_SERVER_KEY": str(tmp_path / "stray" / "k.key")})
            assert proc.returncode == 1 and "does not use CURVE" in proc.stderr

    asyncio.run(scenario())
    assert any("insecure = true" in r.getMessage() and "controller" in r.name for r in caplog.records)
    assert any("insecure = true" in r.getMessage() and "agent" in r.name for r in caplog.records)


def test_keys_cli_init_issue_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from controller.cli.main import main

    keys_dir = tmp_path / "keys"
    assert main(["keys", "init", str(keys_dir)]) == 0
    assert (keys_dir / "controller.key_secret").stat().st_mode & 0o777 == 0o600
    assert main(["keys", "init", str(keys_dir)]) == 0 and "kept the existing" in capsys.readouterr().out
    assert main(["keys", "issue", "--dir", str(keys_dir), "--node", "gpu-01"]) == 0
    assert main(["keys", "issue", "--dir", str(keys_dir), "--user", "alice", "--role", "operator"]) == 0
    assert (keys_dir / "issued" / "gpu-01.key_secret").stat().st_mode & 0o777 == 0o600
    assert main(["keys", "issue", "--dir", str(keys_dir), "--user", "bob"]) == 1
    assert "--user needs --role" in capsys.readouterr().err
    assert main(["keys", "issue", "--dir", str(keys_dir), "--user", "gpu-01", "--role", "viewer"]) == 1
    assert "names are unique" in capsys.readouterr().err
    # rotation: a second key for the same node, then the first revoked by its public key
    assert main(["keys", "issue", "--dir", str(keys_dir), "--node", "gpu-01", "-o", "json"]) == 0
    first = Keyring.load(keys_dir).named("gpu-01")[0].public_key
    capsys.readouterr()
    assert main(["keys", "revoke", "gpu-01", "--key", first, "--dir", str(keys_dir)]) == 0
    assert "revoked 1 key(s) of gpu-01" in capsys.readouterr().out
    assert main(["keys", "list", "--dir", str(keys_dir), "-o", "json"]) == 0
    import json
    listed = json.loads(capsys.readouterr().out)
    assert [(e["name"], e["kind"], e["role"], e["revoked"]) for e in listed] == [
        ("gpu-01", "node", "node", True), ("alice", "user", "operator", False), ("gpu-01", "node", "node", False)]
    assert main(["keys", "revoke", "nobody", "--dir", str(keys_dir)]) == 1
    assert "no live key named 'nobody'" in capsys.readouterr().err
