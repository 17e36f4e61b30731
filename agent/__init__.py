"""The node agent: device telemetry and actuation, components, and its daemon."""
