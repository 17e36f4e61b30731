"""Small synthetic inputs for tests and the demo: videos with known scenes and a JSONL corpus.

Weights and datasets cannot be downloaded here, so tests build inputs whose right answer is known:
a video of N solid-color scenes has N scenes, and a question about one corpus topic should retrieve
that topic's passage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# RGB colors far apart in hue and brightness, so every cut is unmistakable
DEFAULT_SCENE_COLORS: tuple[tuple[int, int, int], ...] = ((200, 30, 30), (30, 170, 60), (40, 60, 210))

# fourcc per container: both write and read back with the opencv-python-headless wheel (checked: mp4v in
# .mp4 and MJPG in .avi do; avc1/H.264 has no encoder in that build)
_FOURCC = {".mp4": "mp4v", ".avi": "MJPG"}

DEFAULT_CORPUS: tuple[dict[str, str], ...] = (
    {"id": "volcano", "text": "Mount Etna is an active volcano on the east coast of Sicily; its eruptions "
                              "send lava flows down its slopes."},
    {"id": "bread", "text": "Sourdough bread rises because wild yeast and lactic acid bacteria in the starter "
                            "ferment the dough."},
    {"id": "tides", "text": "Ocean tides are caused by the gravitational pull of the moon and the sun on "
                            "the earth's oceans."},
    {"id": "chess", "text": "In chess, castling moves the king two squares toward a rook and places the rook "
                            "on the other side of the king."},
    {"id": "honeybees", "text": "Honeybees communicate the direction of flowers to their hive mates with a "
                                "waggle dance."},
)


def make_test_video(path: str | Path, scene_colors: Sequence[tuple[int, int, int]] = DEFAULT_SCENE_COLORS,
                    seconds_per_scene: float = 1.0, fps: int = 10, size: tuple[int, int] = (64, 48)) -> Path:
    """Write a video of one solid-color scene per RGB color in ``scene_colors`` and return its path.

    A small square moves across every scene, so consecutive frames differ without looking like a cut.
    The container follows the suffix: ``.mp4`` (mp4v) or ``.avi`` (MJPG).
    """
    import cv2

    out = Path(path)
    fourcc = _FOURCC.get(out.suffix.lower())
    if fourcc is None:
        raise ValueError(f"video path {out}: use a .mp4 or .avi suffix")
    width, height = size
    frames_per_scene = max(1, round(seconds_per_scene * fps))
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*fourcc), float(fps), (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"this OpenCV build cannot write {fourcc} video to {out}")
    try:
        side = max(2, min(width, height) // 6)
        for red, green, blue in scene_colors:
            brightness = 0.299 * red + 0.587 * green + 0.114 * blue
            marker = (0, 0, 0) if brightness > 128 else (255, 255, 255)
            for i in range(frames_per_scene):
                frame = np.empty((height, width, 3), dtype=np.uint8)
                frame[:] = (blue, green, red)  # OpenCV frames are BGR
                x = (i * max(1, (width - side) // frames_per_scene)) % max(1, width - side)
                y = (height - side) // 2
                frame[y:y + side, x:x + side] = marker
                writer.write(frame)
    finally:
        writer.release()
    return out


def make_corpus_jsonl(path: str | Path, documents: Sequence[dict[str, Any]] = DEFAULT_CORPUS) -> Path:
    """Write ``documents`` as a JSONL corpus (one ``{"id", "text"}`` object a line) and return its path."""
    out = Path(path)
    out.write_text("".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in documents), encoding="utf-8")
    return out


def file_blob(path: str | Path, media_type: str = "") -> dict[str, Any]:
    """A file as a workflow blob value ``{name, media_type, data}``; the media type is guessed from the suffix."""
    import mimetypes

    source = Path(path)
    guessed = mimetypes.guess_type(source.name)[0] or "application/octet-stream"
    if source.suffix.lower() in (".jsonl", ".ndjson"):
        guessed = "application/jsonl"
    return {"name": source.name, "media_type": media_type or guessed, "data": source.read_bytes()}
