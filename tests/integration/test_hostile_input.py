"""Hostile input on live sockets: random bytes, wrong types, oversized frames, unknown ops.

The daemons must stay up, count every rejected frame, and answer with an explicit
error whenever the frame's request id could be read.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import msgpack
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.protocol import (
    MAX_FRAME_BYTES, ErrorReply, GetStatus, HeartbeatAck, ListNodes, SetPowerLimit, decode, encode,
)
from common.security.curve import ClientCredentials, apply_server
from controller.security.keyring import server_credentials
from common.transport import RpcEndpoint
from tests.keys import curve_dealer, make_keys
from tests.integration.cluster import in_process_cluster, wait_until

GARBAGE = [
    b"",
    b"\xc1\xc1\xc1",
    msgpack.packb("just a string"),
    msgpack.packb({"v": 1, "op": "heartbeat", "id": 5, "body": {"node_name": 1}}),
    msgpack.packb({"v": 1, "op": "no_such_op", "id": 6, "body": {}}),
    msgpack.packb({"v": 99, "op": "get_status", "id": 7, "body": {}}),
    msgpack.packb({"v": 1, "op": "register_accepted", "id": 8, "body": {}}),  # malformed reply
    encode(HeartbeatAck(1, "ready"), 8),  # a reply nobody asked for
    encode(SetPowerLimit("c", 1, 1, 0, 300.0), 9),  # valid, but served by agents, not here
    msgpack.packb({"v": 1, "op": "get_node", "id": 10, "body": {"name": msgpack.ExtType(4, b"\x00")}}),
    b"\x00" * 100,
]


async def send_raw(endpoint: str, frames: list[bytes | list[bytes]], identity: bytes,
                   credentials: ClientCredentials | None = None) -> list:
    """Send frames from a raw DEALER and collect whatever comes back within a short wait."""
    ctx = zmq.asyncio.Context()
    sock = curve_dealer(ctx, endpoint, identity, credentials)
    for frame in frames:
        if isinstance(frame, list):
            await sock.send_multipart(frame)
        else:
            await sock.send(frame)
    replies = []
    while await sock.poll(300):
        replies.append(decode(await sock.recv()).message)
    sock.close(0)
    ctx.destroy(linger=0)
    return replies


def rejected(controller, endpoint: str) -> float:
    total = 0.0
    for metric in controller.metrics.frames_rejected.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels["endpoint"] == endpoint:
                total += sample.value
    return total


def test_garbage_on_both_controller_sockets_is_counted_answered_and_survived(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=1) as cluster:
            c = cluster.controller
            oversized = msgpack.packb({"v": 1, "op": "get_node", "id": 1, "body": {"name": "x" * MAX_FRAME_BYTES}})
            frames = [*GARBAGE, [b"two", b"frames"], oversized]
            keys = cluster.keys
            assert keys is not None and c.auth is not None
            # Authenticated peers, each within its rights: hostile frames must still be answered, not obeyed.
            keys.add_node("fuzzer-agents")
            keys.add_user("fuzzer-admin", "admin")
            assert c.auth.reload_if_changed()
            for endpoint, label, creds in ((c.agent_endpoint, "agents", keys.node("fuzzer-agents")),
                                           (c.admin_endpoint, "admin", keys.user("fuzzer-admin"))):
                replies = await send_raw(endpoint, frames, b"fuzzer-" + label.encode(), creds)
                codes = sorted(r.code for r in replies if isinstance(r, ErrorReply))
                # Frames whose id could be read get an explicit error back; the rest are dropped and counted.
                assert "unknown_op" in codes and "unsupported_version" in codes and "invalid_message" in codes
                assert "unsupported_op" in codes
                await wait_until(lambda: rejected(c, label) >= len(GARBAGE) - 1, what=f"{label} rejections counted")
            # MAXMSGSIZE drops the oversized frame in ZeroMQ itself; either way the daemon answers normally.
            status = await asyncio.to_thread(_admin_status, c.admin_endpoint)
            assert status.frames_rejected_total >= 2 * (len(GARBAGE) - 1)
            assert c.registry.nodes["node-0"].state == "ready"

    asyncio.run(scenario())


def _admin_status(address: str):
    from controller.cli.client import AdminClient

    with AdminClient(address) as client:
        return client.call(GetStatus())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(st.binary(max_size=256), min_size=1, max_size=3), min_size=5, max_size=20))
def test_property_random_multipart_frames_never_stop_the_controller(tmp_path_factory, batches) -> None:
    tmp_path = tmp_path_factory.mktemp("fuzz")

    async def scenario() -> None:
        async with in_process_cluster(tmp_path, nodes=1, gpus=1) as cluster:
            c = cluster.controller
            keys = cluster.keys
            assert keys is not None and c.auth is not None
            keys.add_node("prop-fuzzer")
            assert c.auth.reload_if_changed()
            for endpoint, creds in ((c.agent_endpoint, keys.node("prop-fuzzer")), (c.admin_endpoint, keys.user("admin"))):
                await send_raw(endpoint, [b if len(b) > 1 else b[0] for b in batches], b"prop-fuzzer", creds)
            reply = await asyncio.to_thread(_list_nodes, c.admin_endpoint)
            assert [n.name for n in reply.nodes] == ["node-0"]

    asyncio.run(scenario())


def _list_nodes(address: str):
    from controller.cli.client import AdminClient

    with AdminClient(address) as client:
        return client.call(ListNodes())


def test_agent_survives_a_hostile_controller(tmp_path: Path) -> None:
    """A fake controller sends the agent garbage and bogus commands; the agent keeps heartbeating."""
    from agent.config import AgentSettings
    from agent.daemon import Agent
    from agent.devices.sim import open_sim_devices

    async def scenario() -> None:
        # The hostile controller holds the controller key the agent trusts: an authenticated peer.
        keys = make_keys(tmp_path / "keys", ["victim"], {})
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        apply_server(router, server_credentials(keys.keys_dir), "agents")
        port = router.bind_to_random_port("tcp://127.0.0.1")
        settings_ = AgentSettings(node_name="victim", controller=f"tcp://127.0.0.1:{port}", state_dir=tmp_path,
                                  heartbeat_interval_s=0.1, request_timeout_s=0.3, reconnect_base_s=0.05,
                                  reconnect_cap_s=0.3, metrics_enabled=False, key_file=keys.nodes["victim"],
                                  controller_key_file=keys.server_public)
        devices = open_sim_devices(node_name="victim", model="l4", count=1, seed=0, utilization=0.5, ambient_c=25.0,
                                   start_s=time.monotonic())
        agent_ctx = zmq.Context()
        agent = Agent(settings_, devices, ctx=agent_ctx)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            await hostile_exchange(router, agent, task)
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)
            router.close(0)
            ctx.destroy(linger=0)
            agent_ctx.destroy(linger=0)

    async def hostile_exchange(router, agent, task) -> None:
        identity, payload = await asyncio.wait_for(router.recv_multipart(), 5)
        assert decode(payload).message.op == "register"
        rng = random.Random(7)
        garbage = [*GARBAGE, *(rng.randbytes(rng.randint(0, 64)) for _ in range(50))]
        for frame in garbage:
            await router.send_multipart([identity, frame])
        # A well-formed command before registration completed is refused as not registered.
        await router.send_multipart([identity, encode(SetPowerLimit("x", 1, 1, 0, 50.0), 77)])
        seen_ops, refusals = [], []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if not await router.poll(500):
                continue
            _, payload = await router.recv_multipart()
            frame = decode(payload)
            seen_ops.append(frame.message.op)
            if isinstance(frame.message, ErrorReply) and frame.request_id == 77:
                refusals.append(frame.message.code)
            if seen_ops.count("register") >= 3 and refusals:
                break
        assert refusals == ["not_registered"]
        assert seen_ops.count("register") >= 3  # still alive and retrying with backoff
        assert not task.done()
        assert agent.endpoint is not None and agent.endpoint.rejected_total >= len(GARBAGE) - 2

    asyncio.run(scenario())


def test_rpc_endpoint_rejects_and_counts_without_a_socket_peer() -> None:
    """The receive path alone: malformed parts never raise out of handle_parts."""

    async def scenario() -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        codes: list[str] = []
        endpoint = RpcEndpoint(sock, router=True, name="test", dispatch={}, on_rejected=codes.append)
        endpoint.handle_parts([])
        endpoint.handle_parts([b"only-identity"])
        endpoint.handle_parts([b"peer", b"\xc1"])
        endpoint.handle_parts([b"peer", encode(ListNodes(), 3)])  # not served here
        endpoint.handle_parts([b"peer", encode(HeartbeatAck(1, "ready"), 4)])  # nobody asked
        assert codes == ["malformed_frame", "malformed_frame", "malformed_frame", "unsupported_op", "unexpected_reply"]
        assert endpoint.rejected_total == 5
        endpoint.close()
        ctx.destroy(linger=0)

    asyncio.run(scenario())
