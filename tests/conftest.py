"""Suite-wide settings: hypothesis must not flake on a loaded 2-core CI machine."""

from hypothesis import HealthCheck, settings

settings.register_profile("murakkab", deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          print_blob=True)
settings.load_profile("murakkab")
