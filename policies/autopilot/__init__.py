"""The autopilot: one sans-I/O policy engine for the controller daemon and the cluster simulator.

``engine.Autopilot`` takes events (``events``) and returns actions; ``planning`` holds its planning core
in three presets (static, murakkab-epoch, murakkab), ``rollout`` its make-before-break moves,
``reactions`` its heat, power-budget and pin reactions, ``explain`` what ``plan show`` prints.
"""
