"""Backend selection and the settings the agent's config embeds."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from agent.devices import nvml as nvml_backend
from agent.devices.base import DeviceError
from agent.devices.cpu import CpuDevice
from common.devices.gpu_specs import gpu_spec
from agent.devices.select import CpuSettings, SimSettings, fault_hook, open_devices
from agent.devices.sim import SimGpu


def open_(backend: str, **overrides):
    args = {"node_name": "n", "sim": None, "cpu": None, "include_cpu": False, "start_s": 0.0} | overrides
    return open_devices(backend, **args)


def describe(devices) -> list[tuple[int, str, str]]:
    return [(d.info.index, d.info.kind, d.info.backend) for d in devices]


@pytest.fixture
def no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> list:
        raise DeviceError("NVML did not initialize (Driver Not Loaded); is the NVIDIA driver installed?")

    monkeypatch.setattr(nvml_backend, "open_nvml_devices", fail)


def test_auto_falls_back_to_the_cpu_when_nvml_is_unavailable(no_nvml: None) -> None:
    devices = open_("auto", include_cpu=False, cpu=CpuSettings(tdp_w=120.0, idle_w=30.0))
    assert describe(devices) == [(0, "cpu", "cpu")]
    assert isinstance(devices[0], CpuDevice) and devices[0].tdp_w == 120.0


def test_auto_falls_back_to_the_cpu_when_nvml_sees_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nvml_backend, "open_nvml_devices", list)
    assert describe(open_("auto")) == [(0, "cpu", "cpu")]
    with pytest.raises(DeviceError, match="found no GPUs"):
        open_("nvml")


def test_auto_uses_nvml_gpus_first_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = [SimGpu(i, gpu_spec("l4"), seed=i, node_name="n") for i in range(2)]  # stand-ins for NVML devices
    monkeypatch.setattr(nvml_backend, "open_nvml_devices", lambda: gpus)
    assert [d.info.index for d in open_("auto", include_cpu=True)] == [0, 1, 2]
    assert open_("auto", include_cpu=False) == gpus


def test_nvml_without_a_gpu_is_a_clear_error(no_nvml: None) -> None:
    with pytest.raises(DeviceError, match="NVML did not initialize"):
        open_("nvml", include_cpu=True)


def test_nvml_on_this_machine_either_opens_gpus_or_says_why() -> None:
    """The real bindings, unpatched: on CI (no driver) a DeviceError, on a GPU host real devices."""
    if nvml_backend.nvml_available():
        devices = open_("nvml")
        assert devices and all(d.info.backend == "nvml" and not d.info.simulated for d in devices)
        for device in devices:
            device.close()
    else:
        with pytest.raises(DeviceError, match="NVML did not initialize"):
            open_("nvml")
        assert describe(open_("auto")) == [(0, "cpu", "cpu")]


def test_sim_gives_n_gpus_then_the_cpu_with_the_next_index() -> None:
    sim = SimSettings(model="a100", count=3, seed=1, utilization=0.5, ambient_c=30.0)
    devices = open_("sim", sim=sim, cpu=CpuSettings(), include_cpu=True, node_name="rack1-n7")
    assert describe(devices) == [(0, "gpu", "sim"), (1, "gpu", "sim"), (2, "gpu", "sim"), (3, "cpu", "cpu")]
    assert all(d.info.simulated for d in devices[:3]) and not devices[3].info.simulated
    assert devices[0].info.uuid == "SIM-GPU-rack1-n7-0" and devices[3].info.uuid == "CPU-rack1-n7-3"
    assert devices[0].sample(1.0).utilization_pct == 50.0
    assert describe(open_("sim", sim=SimSettings(count=2))) == [(0, "gpu", "sim"), (1, "gpu", "sim")]
    with pytest.raises(DeviceError, match="needs sim settings"):
        open_("sim")


def test_cpu_backend_and_unknown_backend() -> None:
    assert describe(open_("cpu", include_cpu=False)) == [(0, "cpu", "cpu")]
    with pytest.raises(DeviceError, match="unknown device backend 'tpu'"):
        open_("tpu")


def test_sim_settings_validate() -> None:
    assert SimSettings().model_dump()["count"] == 8
    for bad, fragment in (({"model": "v100"}, "unknown GPU model"), ({"count": 65}, "count"),
                          ({"count": -1}, "count"), ({"utilization": 1.5}, "utilization"),
                          ({"ambient_c": 90.0}, "ambient_c"), ({"colour": "red"}, "Extra inputs"),
                          ({"count": 2, "faults": [{"at_s": 1, "device": 4, "kind": "xid"}]}, "device 4"),
                          ({"faults": [{"at_s": 1, "device": 0, "kind": "meteor"}]}, "kind"),
                          ({"faults": [{"at_s": -1, "device": 0, "kind": "xid"}]}, "at_s")):
        with pytest.raises(ValidationError, match=fragment):
            SimSettings(**bad)


def test_cpu_settings_validate() -> None:
    with pytest.raises(ValidationError, match="idle_w"):
        CpuSettings(tdp_w=50.0, idle_w=60.0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        CpuSettings(tdp=50.0)
    with pytest.raises(ValidationError, match="tdp_w"):
        CpuSettings(tdp_w=0.0)


def test_fault_hook_applies_configured_faults() -> None:
    sim = SimSettings(count=2, utilization=1.0, faults=[{"at_s": 5, "device": 1, "kind": "fall_off_bus"},
                                                       {"at_s": 1, "device": 0, "kind": "xid", "xid": 48}])
    devices = open_("sim", sim=sim, include_cpu=True, start_s=100.0)
    hook = fault_hook(sim, devices, 100.0)
    assert hook is not None
    assert [f.kind for f in hook(102.0)] == ["xid"]
    assert devices[0].sample(102.0).last_xid == 48 and devices[1].sample(102.0).health == "ok"
    assert [f.kind for f in hook(106.0)] == ["fall_off_bus"]
    assert devices[1].sample(106.0).health == "lost"
    assert fault_hook(SimSettings(), devices, 0.0) is None and fault_hook(None, devices, 0.0) is None
