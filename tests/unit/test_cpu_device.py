"""The host CPU device: modeled power from an injected utilization reader, RAPL counters from a fake sysfs."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.devices.base import PowerLimitUnsupported
from agent.devices.cpu import CpuDevice, RaplCounter, cpu_model_name


def scripted(readings: list[float]):
    values = iter(readings)
    return lambda: next(values)


def test_modeled_power_follows_utilization_between_idle_and_tdp() -> None:
    reader = scripted([0.0, 25.0, 100.0, 140.0, -5.0])
    cpu = CpuDevice(0, tdp_w=100.0, idle_w=20.0, start_s=10.0, utilization_reader=reader, node_name="n1")
    powers = [cpu.sample(t).power_w for t in (11.0, 12.0, 14.0, 15.0, 16.0)]
    assert powers == [20.0, 40.0, 100.0, 100.0, 20.0]  # readings outside 0..100 are clamped
    assert all(20.0 <= p <= 100.0 for p in powers)
    assert cpu.power_source == "model"


def test_modeled_energy_is_the_integral_of_power() -> None:
    readings = [10.0, 60.0, 30.0, 90.0, 0.0]
    cpu = CpuDevice(0, tdp_w=200.0, idle_w=40.0, start_s=0.0, utilization_reader=scripted(readings))
    times = [0.5, 2.0, 2.25, 5.0, 6.0]
    samples = [cpu.sample(t) for t in times]
    expected_j = sum((40.0 + 160.0 * u / 100.0) * dt for u, dt in zip(readings, [0.5, 1.5, 0.25, 2.75, 1.0]))
    assert samples[-1].energy_j == pytest.approx(expected_j)
    energies = [s.energy_j for s in samples]
    assert energies == sorted(energies)


def test_wall_clock_stepping_back_adds_no_energy_and_does_not_fail() -> None:
    cpu = CpuDevice(0, tdp_w=100.0, idle_w=20.0, start_s=0.0, utilization_reader=lambda: 50.0)
    at_two = cpu.sample(2.0).energy_j
    assert cpu.sample(1.5).energy_j == at_two
    assert cpu.sample(3.0).energy_j == pytest.approx(at_two + 60.0)


def test_inventory_power_limit_and_validation() -> None:
    cpu = CpuDevice(3, tdp_w=100.0, idle_w=20.0, start_s=0.0, utilization_reader=lambda: 0.0, node_name="n1")
    info = cpu.info
    assert (info.index, info.kind, info.backend, info.simulated, info.uuid) == (3, "cpu", "cpu", False, "CPU-n1-3")
    assert info.memory_total_bytes > 0 and info.power_limit_max_w is None
    sample = cpu.sample(1.0)
    assert sample.power_limit_w is None and sample.memory_total_bytes == info.memory_total_bytes
    assert 0 < sample.memory_used_bytes <= sample.memory_total_bytes
    with pytest.raises(PowerLimitUnsupported, match="CPU power limit"):
        cpu.set_power_limit(50.0)
    with pytest.raises(ValueError, match="idle_w < tdp_w"):
        CpuDevice(0, tdp_w=10.0, idle_w=20.0, start_s=0.0, utilization_reader=lambda: 0.0)


def test_the_default_reader_measures_this_host() -> None:
    cpu = CpuDevice(0, tdp_w=100.0, idle_w=20.0, start_s=0.0)
    sample = cpu.sample(0.05)
    assert 0.0 <= sample.utilization_pct <= 100.0 and 20.0 <= sample.power_w <= 100.0


def test_model_name_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core Processor\n")
    assert cpu_model_name(cpuinfo) == "AMD EPYC 9654 96-Core Processor"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # ARM: no model name line
    assert cpu_model_name(cpuinfo) == "CPU"
    assert cpu_model_name(tmp_path / "missing") == "CPU"


# --- RAPL -----------------------------------------------------------------------------------


def zone(root: Path, name: str, label: str, energy_uj: int, range_uj: int = 1_000_000) -> Path:
    directory = root / name
    directory.mkdir()
    (directory / "name").write_text(label + "\n")
    (directory / "energy_uj").write_text(f"{energy_uj}\n")
    (directory / "max_energy_range_uj").write_text(f"{range_uj}\n")
    return directory


def test_rapl_sums_packages_unwraps_and_ignores_psys_and_subzones(tmp_path: Path) -> None:
    pkg0 = zone(tmp_path, "intel-rapl:0", "package-0", 900_000)
    pkg1 = zone(tmp_path, "intel-rapl:1", "package-1", 100_000)
    zone(tmp_path, "intel-rapl:0:0", "core", 5)
    zone(tmp_path, "intel-rapl:2", "psys", 7)
    assert RaplCounter.package_zones(tmp_path) == [pkg0, pkg1]
    counter = RaplCounter.open(tmp_path)
    assert counter is not None and counter.read_j() == 0.0
    (pkg0 / "energy_uj").write_text("950000\n")
    (pkg1 / "energy_uj").write_text("150000\n")
    assert counter.read_j() == pytest.approx(0.1)
    (pkg0 / "energy_uj").write_text("50000\n")  # wrapped past max_energy_range_uj
    assert counter.read_j() == pytest.approx(0.2)
    assert RaplCounter.open(tmp_path / "nothing-here") is None


def test_cpu_power_from_rapl_and_fallback_when_it_breaks(tmp_path: Path) -> None:
    pkg = zone(tmp_path, "intel-rapl:0", "package-0", 0, range_uj=10**12)
    counter = RaplCounter.open(tmp_path)
    cpu = CpuDevice(0, tdp_w=100.0, idle_w=20.0, start_s=0.0, utilization_reader=lambda: 50.0, rapl=counter)
    assert cpu.power_source == "rapl"
    (pkg / "energy_uj").write_text(f"{90 * 2 * 10**6}\n")  # 180 J in 2 s
    sample = cpu.sample(2.0)
    assert sample.power_w == pytest.approx(90.0) and sample.energy_j == pytest.approx(180.0)
    (pkg / "energy_uj").unlink()  # e.g. permissions tightened by a kernel update
    fallback = cpu.sample(3.0)
    assert cpu.power_source == "model"
    assert fallback.power_w == 60.0 and fallback.energy_j == pytest.approx(240.0)


def test_unreadable_rapl_is_treated_as_absent(tmp_path: Path) -> None:
    pkg = zone(tmp_path, "intel-rapl:0", "package-0", 0)
    (pkg / "energy_uj").write_text("not a number\n")  # stands in for root-only energy_uj
    assert RaplCounter.open(tmp_path) is None
