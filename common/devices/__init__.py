"""Shared knowledge of devices: GPU specs, the DVFS and thermal operating point, calibration."""
