"""Discrete-event cluster simulator: the real policies, placement and reconciler in virtual time.

- ``scenario``: the Scenario YAML (cluster, catalog, workflows, trace, control) and its validation.
- ``trace``: diurnal rates with bursts and seeded Poisson arrivals per (workflow, SLO tier).
- ``cluster``: simulated nodes and agents (start-up delays, draining, memory, power caps).
- ``queueing`` / ``service``: per-step service through instance pools (Erlang C), shedding, SLOs.
- ``slo``: the SLO judge (accuracy floors and latency bounds, as the planner defines them).
- ``engine``: the event loop driving policy -> placement -> reconciler -> agents; energy accounting.
- ``report``: report.json and the plots; ``run``: wiring for one run (``murakkabctl sim run``).
"""
