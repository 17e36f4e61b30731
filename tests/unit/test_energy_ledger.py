"""Per-invocation energy from cumulative counters, with exact numbers."""

from __future__ import annotations

import pytest

from agent.components.energy import EnergyLedger


def test_single_invocation_gets_the_whole_delta() -> None:
    ledger = EnergyLedger()
    ledger.begin("a", {0: 1000.0})
    assert ledger.finish("a", {0: 1250.0}) == 250.0


def test_concurrent_invocations_split_each_interval_equally() -> None:
    ledger = EnergyLedger()
    ledger.begin("a", {0: 100.0})  # a alone until 160
    ledger.begin("b", {0: 160.0})  # a and b share 160..220
    ledger.observe(0, 220.0)  # a periodic sample
    ledger.begin("c", {0: 220.0})  # a, b, c share 220..310
    assert ledger.finish("a", {0: 310.0}) == 60.0 + 30.0 + 30.0
    # b and c share 310..330
    assert ledger.finish("b", {0: 330.0}) == 30.0 + 30.0 + 10.0
    assert ledger.finish("c", {0: 400.0}) == 30.0 + 10.0 + 70.0
    assert len(ledger) == 0


def test_idle_energy_is_nobodys() -> None:
    ledger = EnergyLedger()
    ledger.observe(0, 0.0)
    ledger.observe(0, 500.0)  # nothing running: not attributed
    ledger.begin("a", {0: 600.0})
    assert ledger.finish("a", {0: 650.0}) == 50.0
    ledger.observe(0, 900.0)
    ledger.begin("b", {0: 1000.0})
    assert ledger.finish("b", {0: 1001.5}) == 1.5


def test_multi_device_invocation_sums_its_shares() -> None:
    ledger = EnergyLedger()
    ledger.begin("tp2", {0: 0.0, 1: 10.0})  # tensor parallel over two GPUs
    ledger.begin("other", {1: 30.0})  # shares GPU 1 from 30
    assert ledger.finish("other", {1: 50.0}) == 10.0
    assert ledger.finish("tp2", {0: 100.0, 1: 90.0}) == 100.0 + (20.0 + 10.0 + 40.0)


def test_no_devices_means_no_energy() -> None:
    ledger = EnergyLedger()
    ledger.begin("tool", {})
    assert ledger.finish("tool", {}) is None


def test_unreadable_readings_carry_over_to_the_next_one() -> None:
    ledger = EnergyLedger()
    ledger.begin("a", {0: 10.0})
    ledger.observe(0, None)
    ledger.begin("b", {0: None})  # b joins; the device could not be read at that instant
    # The whole 10..40 interval is split between a and b, as both were active at the next reading.
    assert ledger.finish("a", {0: 40.0}) == 15.0
    assert ledger.finish("b", {0: None}) == 15.0


def test_counter_going_backwards_contributes_nothing() -> None:
    ledger = EnergyLedger()
    ledger.begin("a", {0: 5000.0})
    ledger.observe(0, 20.0)  # the driver reloaded: the counter restarted
    assert ledger.finish("a", {0: 45.0}) == 25.0


def test_misuse_is_an_error() -> None:
    ledger = EnergyLedger()
    ledger.begin("a", {0: 0.0})
    with pytest.raises(ValueError, match="already began"):
        ledger.begin("a", {0: 1.0})
    with pytest.raises(ValueError, match="never began"):
        ledger.finish("zzz", {})
    assert ledger.active(0) == frozenset({"a"}) and ledger.active(7) == frozenset()
