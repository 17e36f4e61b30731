"""Tool executors: plain Python functions ``fn(inputs, knobs) -> outputs`` that the tool engine runs.

Catalogs name them by entry point (``module:function``); ``ENTRY_POINTS`` lists the ones shipped here,
per task. Modules are imported only when a catalog uses them, so an agent without OpenCV can still run
the other tools.
"""

ENTRY_POINTS: dict[str, str] = {
    "load-documents": "agent.tools.documents:load_documents",
    "retrieve": "agent.tools.retrieve:retrieve",
    "scene-detection": "agent.tools.video:detect_scenes",
    "frame-extraction": "agent.tools.video:extract_frames",
    "code-execution": "agent.tools.sandbox:execute_code",
    "rank-candidates": "agent.tools.rank:rank_candidates",
}
