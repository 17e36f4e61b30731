"""The shared MQTT layer: settings (the ``[mqtt]`` table), the reconnecting link, and strict payload decoding.

MQTT is optional and never on the ZeroMQ control path; see docs/mqtt.md for the topics.
"""
