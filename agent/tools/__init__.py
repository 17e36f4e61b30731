"""Tool executors: plain Python functions ``fn(inputs, knobs) -> outputs`` that the tool engine runs.

Catalogs name them by entry point (``module:function``, e.g. ``agent.tools.retrieve:retrieve``). Modules are imported only when a catalog uses them, so an agent without OpenCV can still run
the other tools.
"""
