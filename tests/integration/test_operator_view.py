"""The operator's view (issue 15, item 6): Prometheus rules and Grafana dashboard in ``deploy/``, checked against
promtool and against what the live daemons export.

- ``promtool check rules`` and ``promtool test rules`` on ``deploy/prometheus/``;
- ``promtool check metrics`` on the live controller's and agents' endpoints of an in-process cluster (sim GPUs,
  plus an agent for this host's CPU) after a small workload: the only findings allowed are promtool's
  snake_case complaint on families that carry DCGM's own ``UUID`` and ``modelName`` labels (promtool 2.42 flags
  only ``modelName``), and those two are checked by hand to be the only label names that are not snake_case;
- the host CPU has its own metric families, never DCGM's GPU names;
- the dashboard parses, and every metric each panel query names is one the live endpoints export (the rules'
  expressions too, less ``up`` and the rules' own recorded names).

promtool comes from Debian's ``prometheus`` package (the Makefile installs it). Without it these tests skip,
unless ``MURAKKAB_REQUIRE_PROMTOOL=1``, where they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from agent.config import AgentSettings
from agent.daemon import Agent
from agent.devices.cpu import CpuDevice
from common.metrics import DeviceCollector
from common.protocol import DeviceInfo, DeviceTelemetry, SetPowerBudget, SubmitJob
from tests.integration.cluster import FAST, InProcessCluster, agent_key_settings, in_process_cluster, wait_until
from tests.integration.test_autopilot_cluster import chat_executor
from tests.integration.test_workflow_jobs import call, setup, slow_chat_workflow, wait_job

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "murakkab.rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "murakkab.rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "murakkab.json"

# DCGM's own label names, kept on purpose so DCGM dashboards work unchanged; promtool wants snake_case.
ALLOWED_NON_SNAKE_LABELS = frozenset({"UUID", "modelName"})
SNAKE = re.compile(r"^[a-z_][a-z0-9_]*$")
CAMEL_LABEL_FINDING = "label names should be written in 'snake_case' not 'camelCase'"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("MURAKKAB_REQUIRE_PROMTOOL") == "1":
            pytest.fail("promtool is missing and MURAKKAB_REQUIRE_PROMTOOL=1 (apt-get install prometheus)")
        pytest.skip("promtool is missing (Debian's prometheus package; make test installs it)")
    return path


def run_promtool(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=cwd)


# --- rules ---------------------------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    proc = run_promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    """Node lost, budget exceeded, SLO attainment, jobs failing, and GPUs summed without CPUs."""
    proc = run_promtool("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_rules_cover_what_the_issue_asks() -> None:
    import yaml

    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {r["alert"] for g in groups for r in g["rules"] if "alert" in r}
    assert {"MurakkabNodeLost", "MurakkabGpuHot", "MurakkabGpuThrottling", "MurakkabPowerBudgetExceeded",
            "MurakkabSloAttainmentFalling", "MurakkabJobsFailing"} <= alerts
    for group in groups:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
                assert rule["annotations"]["summary"], rule["alert"]


# --- the CPU has metrics of its own --------------------------------------------------------------


def test_cpus_are_not_exported_under_dcgm_gpu_names() -> None:
    gpu = DeviceInfo(index=0, kind="gpu", model="NVIDIA H100", uuid="GPU-1", backend="sim", simulated=True,
                     memory_total_bytes=80 << 30)
    cpu = DeviceInfo(index=1, kind="cpu", model="Some CPU", uuid="CPU-n0-1", backend="cpu", simulated=False,
                     memory_total_bytes=64 << 30)
    gpu_sample = DeviceTelemetry(0, 300.0, 1000.0, 60.0, 1 << 30, 80 << 30, 90.0, 1980, 700.0,
                                 ("sw_thermal_slowdown",))
    cpu_sample = DeviceTelemetry(1, 95.0, 5000.0, None, 8 << 30, 64 << 30, 50.0, 2400, None)
    families = {f.name: f for f in DeviceCollector(lambda: [("n0", gpu, gpu_sample), ("n0", cpu, cpu_sample)])
                .collect()}
    for name in ("DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED",
                 "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"):
        assert [s.labels["gpu"] for s in families[name].samples] == ["0"], name
    assert [(s.labels, s.value) for s in families["murakkab_cpu_power_watts"].samples] == [
        ({"node": "n0", "cpu": "1", "model": "Some CPU", "simulated": "false"}, 95.0)]
    assert families["murakkab_cpu_utilization_ratio"].samples[0].value == pytest.approx(0.5)
    assert families["murakkab_cpu_energy_joules"].samples[0].name == "murakkab_cpu_energy_joules_total"
    assert families["murakkab_cpu_energy_joules"].samples[0].value == 5000.0
    assert families["murakkab_cpu_clock_hertz"].samples[0].value == 2.4e9
    assert families["murakkab_cpu_temperature_celsius"].samples == []  # no sensor: no series
    assert [s.labels["reason"] for s in families["murakkab_gpu_throttle_reason"].samples] == ["sw_thermal_slowdown"]
    assert {s.labels["kind"] for s in families["murakkab_device_healthy"].samples} == {"gpu", "cpu"}


# --- the live endpoints --------------------------------------------------------------------------


async def scrape(port: int | None) -> str:
    assert port is not None
    url = f"http://127.0.0.1:{port}/metrics"
    return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())


async def add_cpu_agent(cluster: InProcessCluster, tmp_path: Path, ctx: zmq.Context) -> tuple[Agent, asyncio.Task[Any],
                                                                                                 asyncio.Event]:
    """An agent for this host's CPU (modeled power, no RAPL), metrics enabled, joined to the cluster."""
    name = "cpu-node"
    key_settings = agent_key_settings(cluster.keys, name)
    if cluster.controller.auth is not None:
        cluster.controller.auth.reload_if_changed()
    settings = AgentSettings(
        node_name=name, controller=cluster.controller.agent_endpoint, state_dir=tmp_path / name,
        heartbeat_interval_s=FAST["heartbeat_interval_s"], sample_interval_s=0.05, request_timeout_s=0.5,
        reconnect_base_s=0.05, reconnect_cap_s=0.5, metrics_enabled=True, metrics_port=0, engine_user="root",
        **key_settings)
    agent = Agent(settings, [CpuDevice(0, tdp_w=65.0, idle_w=10.0, start_s=time.monotonic(), node_name=name)], ctx=ctx)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await wait_until(lambda: (n := cluster.controller.registry.nodes.get(name)) is not None and n.state == "ready",
                     what="the CPU agent ready")
    return agent, task, stop


def promtool_findings(text: str) -> list[str]:
    """promtool check metrics' lint findings for an exposition: it exits 3 when it has any, 1 when the
    exposition does not parse (a failure here, whatever it says)."""
    proc = run_promtool("check", "metrics", stdin=text)
    findings = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode in (0, 3), proc.stdout + proc.stderr
    assert (proc.returncode == 0) == (not findings), (proc.returncode, findings)
    return findings


def check_lint(text: str, where: str) -> None:
    families = list(text_string_to_metric_families(text))
    label_names = {label for f in families for s in f.samples for label in s.labels}
    odd = {label for label in label_names if not SNAKE.match(label)}
    assert odd <= ALLOWED_NON_SNAKE_LABELS, f"{where}: label names not snake_case: {odd - ALLOWED_NON_SNAKE_LABELS}"
    # promtool names the family, not the label: a finding is allowed on a family that carries DCGM's labels
    with_camel = {f.name for f in families if any(ALLOWED_NON_SNAKE_LABELS & set(s.labels) for s in f.samples)}
    for finding in promtool_findings(text):
        metric, _, message = finding.partition(" ")
        assert message == CAMEL_LABEL_FINDING and metric in with_camel, f"{where}: promtool: {finding}"


def test_the_lint_check_allows_dcgm_labels_and_nothing_else() -> None:
    dcgm = ('# HELP DCGM_FI_DEV_GPU_TEMP Device temperature (C).\n# TYPE DCGM_FI_DEV_GPU_TEMP gauge\n'
            'DCGM_FI_DEV_GPU_TEMP{UUID="GPU-1",gpu="0",modelName="H100",node="n0"} 50.0\n')
    check_lint(dcgm, "DCGM labels")
    with pytest.raises(AssertionError, match="promtool"):  # a gauge named like a counter
        check_lint(dcgm + "# HELP murakkab_things_total Things.\n# TYPE murakkab_things_total gauge\n"
                   "murakkab_things_total 1.0\n", "a gauge named _total")
    with pytest.raises(AssertionError, match="snake_case"):
        check_lint('# HELP x_watts X.\n# TYPE x_watts gauge\nx_watts{deviceName="a"} 1.0\n', "camelCase label")


def exported_names(*texts: str) -> set[str]:
    names: set[str] = set()
    for text in texts:
        for family in text_string_to_metric_families(text):
            names.add(family.name)
            names.update(s.name for s in family.samples)
            if family.type == "counter":
                names.add(family.name + "_total")
            elif family.type == "histogram":
                names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


PROMQL_WORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                          "bool", "offset", "inf", "nan"})


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, label matchers, ranges, groupings, functions
    and keywords removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word, rest = match.group(0), text[match.end():].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        if match.start() > 0 and (text[match.start() - 1].isdigit() or text[match.start() - 1] == "."):
            continue  # the exponent or unit of a number
        names.add(word)
    return names


def test_metric_names_in_parses_promql() -> None:
    assert metric_names_in('sum by (workflow, le) (rate(a_bucket{job="x", b=~"c|d"}[$__rate_interval]))\n'
                           '  / on (workflow) group_left b_count > 0.5e3 and c') == {"a_bucket", "b_count", "c"}
    assert metric_names_in("histogram_quantile(0.99, x)") == {"x"}


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    queries = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", ())]:
            for target in inner.get("targets", ()):
                queries.append((inner["title"], target["expr"]))
    return queries


def test_the_dashboard_is_a_grafana_model_with_the_panels_the_issue_asks() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    assert any(v["name"] == "DS_PROMETHEUS" and v["type"] == "datasource" for v in dashboard["templating"]["list"])
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for what in ("power against budgets", "temperature", "slo attainment per tier", "energy per request",
                 "plan changes and migrations"):
        assert what in titles, what


def test_live_endpoints_pass_promtool_and_export_what_dashboard_and_rules_query(tmp_path: Path) -> None:
    promtool()
    import yaml

    async def scenario() -> tuple[str, str, str]:
        async with in_process_cluster(tmp_path, nodes=2, gpus=2, utilization=0.0) as cluster:
            ctx = zmq.Context()
            cpu_agent, task, stop = await add_cpu_agent(cluster, tmp_path, ctx)
            try:
                await setup(cluster, ("slow-chat.yaml", slow_chat_workflow()), extra=[chat_executor(startup_s=0.2)])
                for question in ("one?", "two?"):
                    accepted = await call(cluster, SubmitJob("slow-chat", {"question": question}))
                    job = await wait_job(cluster, accepted.job_id, 30)
                    assert job.state == "succeeded", job.reason
                await call(cluster, SetPowerBudget(None, 50_000.0))
                await wait_until(lambda: bool(cluster.controller.workloads.autopilot.budget_view()["budgets"]),
                                 what="the budget in force")
                await asyncio.sleep(0.3)  # a few heartbeats from the CPU agent
                return (await scrape(cluster.controller.metrics_port),
                        await scrape(cluster.agents["node-0"].metrics_port), await scrape(cpu_agent.metrics_port))
            finally:
                stop.set()
                await asyncio.gather(task, return_exceptions=True)
                ctx.destroy(linger=0)

    controller, gpu_agent, cpu_agent = asyncio.run(scenario())
    for text, where in ((controller, "controller"), (gpu_agent, "agent node-0"), (cpu_agent, "agent cpu-node")):
        check_lint(text, where)

    # CPUs under their own names, on the controller (every node) and on their agent; GPUs only under DCGM's.
    by_name = {f.name: f for f in text_string_to_metric_families(controller)}
    assert {s.labels["node"] for s in by_name["DCGM_FI_DEV_POWER_USAGE"].samples} == {"node-0", "node-1"}
    assert len(by_name["DCGM_FI_DEV_POWER_USAGE"].samples) == 4
    assert [s.labels["node"] for s in by_name["murakkab_cpu_power_watts"].samples] == ["cpu-node"]
    assert 'murakkab_cpu_power_watts{cpu="0"' in cpu_agent and "DCGM_FI_DEV_POWER_USAGE{" not in cpu_agent
    assert "murakkab_cpu_energy_joules_total{" in cpu_agent
    # What the rules and the dashboard need, live.
    states = {s.labels["state"]: s.value for s in by_name["murakkab_nodes"].samples}
    assert states["ready"] == 3 and states["lost"] == 0
    assert {(s.labels["scope"], s.value) for s in by_name["murakkab_power_budget_watts"].samples} == {("cluster", 50_000)}
    assert sum(s.value for s in by_name["murakkab_job_latency_seconds"].samples
               if s.name == "murakkab_job_latency_seconds_count" and s.labels["workflow"] == "slow-chat") == 2
    assert sum(s.value for s in by_name["murakkab_jobs_slo"].samples if s.name == "murakkab_jobs_slo_total") == 2
    assert any(s.labels["kind"] == "plan" for s in by_name["murakkab_autopilot_decisions"].samples)

    exported = exported_names(controller, gpu_agent, cpu_agent)
    dashboard = json.loads(DASHBOARD.read_text())
    for title, expr in dashboard_queries(dashboard):
        names = metric_names_in(expr)
        assert names, f"{title}: no metric in {expr!r}"
        assert names <= exported, f"dashboard panel {title!r} queries {names - exported}, which nothing exports"
    recorded = set()
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            names = metric_names_in(rule["expr"]) - recorded - {"up"}
            assert names <= exported, f"rule {rule.get('record') or rule.get('alert')} queries {names - exported}"
            if "record" in rule:
                recorded.add(rule["record"])
