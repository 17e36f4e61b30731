"""The scene-detection and frame-extraction tools, on OpenCV.

A cut is where the HSV color histograms of consecutive frames stop resembling each other
(Bhattacharyya distance above ``threshold``); histograms ignore motion inside a shot, which is why
they, not pixel differences, decide. The video arrives as bytes, so it is written to a private
temporary file for OpenCV's FFmpeg reader and removed afterwards.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from agent.tools.base import ToolError, blob_data, float_knob, int_knob, list_input

MAX_VIDEO_BYTES = 512 * 1024 * 1024
MAX_FRAMES = 200_000  # about 1.8 hours at 30 frames/s
MAX_DECODE_S = 300.0  # a thread cannot be killed, so decoding stops itself
MAX_SCENES = 10_000
MAX_OUTPUT_FRAMES = 256
DEFAULT_THRESHOLD = 0.5
DEFAULT_MIN_SCENE_S = 0.5
DEFAULT_FRAMES = 8
DEFAULT_JPEG_QUALITY = 90
_HIST_BINS = [18, 8, 8]  # hue, saturation, value: value bins tell black from white, which have no hue
_HIST_RANGES = [0, 180, 0, 256, 0, 256]
_HIST_WIDTH = 160  # frames are shrunk to this width first: histograms barely change, decoding dominates


def detect_scenes(inputs: dict[str, Any], knobs: dict[str, Any]) -> dict[str, Any]:
    """Split ``inputs["video"]`` into ``scenes`` [{index, start_s, end_s}] (end exclusive, seconds).

    Knobs: ``threshold`` (0..1, default 0.5) is the histogram distance that counts as a cut;
    ``min_scene_s`` (default 0.5) drops cuts closer than that to the previous one, so a flash or a
    fast pan does not split a shot.
    """
    cv2 = _cv2()
    threshold = float_knob(knobs, "threshold", DEFAULT_THRESHOLD, 0.0, 1.0)
    min_scene_s = float_knob(knobs, "min_scene_s", DEFAULT_MIN_SCENE_S, 0.0, 3600.0)
    with _OpenedVideo(inputs) as (capture, fps):
        min_frames = max(1, math.ceil(min_scene_s * fps - 1e-9))
        cuts = [0]
        previous = None
        count = 0
        for index, frame in _frames(capture, lambda _: True):
            count = index + 1
            if frame is None:  # grabbed but not decodable: no evidence of a cut either way
                continue
            hist = _histogram(cv2, frame)
            if previous is not None and index - cuts[-1] >= min_frames \
                    and cv2.compareHist(previous, hist, cv2.HISTCMP_BHATTACHARYYA) > threshold:
                if len(cuts) >= MAX_SCENES:
                    raise ToolError(f"video has more than {MAX_SCENES} scenes at threshold {threshold:g}; "
                                    "raise the threshold or min_scene_s")
                cuts.append(index)
            previous = hist
    if count == 0:
        raise ToolError("video has no decodable frames")
    bounds = cuts + [count]
    scenes = [{"index": i, "start_s": round(bounds[i] / fps, 6), "end_s": round(bounds[i + 1] / fps, 6)}
              for i in range(len(cuts))]
    return {"scenes": scenes}


def extract_frames(inputs: dict[str, Any], knobs: dict[str, Any]) -> dict[str, Any]:
    """Pick ``frames`` (knob, default 8) JPEG frames spread over ``inputs["scenes"]``.

    Every scene gets a frame while the budget allows (the longest scenes first when it does not), the
    rest go to scenes in proportion to their length. Within a scene the middle comes first, then the
    quarter points, then the eighths, so every added frame fills the largest gap. Output ``frames`` are
    image blobs in time order named ``frame-NNNN.jpg`` after their frame number in the video (zero-based).
    Knob ``jpeg_quality`` (default 90).
    """
    cv2 = _cv2()
    budget = int_knob(knobs, "frames", DEFAULT_FRAMES, 1, MAX_OUTPUT_FRAMES)
    quality = int_knob(knobs, "jpeg_quality", DEFAULT_JPEG_QUALITY, 1, 100)
    scenes = _scenes(list_input(inputs, "scenes", MAX_SCENES))
    with _OpenedVideo(inputs) as (capture, fps):
        wanted = _frame_numbers(scenes, budget, fps)
        last = max(wanted)
        picked: list[tuple[int, np.ndarray]] = []
        for index, frame in _frames(capture, lambda i: i in wanted, stop_after=last):
            if frame is not None:
                picked.append((index, frame))
    if not picked:
        raise ToolError(f"the scenes lie outside the video (first requested frame {min(wanted)}, "
                        f"at {min(wanted) / fps:.3f} s)")
    images = []
    for index, frame in picked:
        ok, encoded = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise ToolError(f"could not encode frame {index} as JPEG")
        images.append({"name": f"frame-{index:04d}.jpg", "media_type": "image/jpeg", "data": encoded.tobytes()})
    return {"frames": images}


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as exc:  # the agent host lacks the video extra
        raise ToolError(f"OpenCV is not installed on this agent ({exc}); install opencv-python-headless") from None
    return cv2


class _OpenedVideo:
    """Context manager: the video blob in a private temporary file, opened with FFmpeg; yields (capture, fps)."""

    def __init__(self, inputs: dict[str, Any]) -> None:
        self.name, self.media_type, self.data = blob_data(inputs, "video", MAX_VIDEO_BYTES)
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        self.capture: Any = None

    def __enter__(self) -> tuple[Any, float]:
        cv2 = _cv2()
        if not self.data:
            raise ToolError(f"video {self.name!r} is empty")
        self.tmp = tempfile.TemporaryDirectory(prefix="murakkab-video-")
        path = Path(self.tmp.name) / f"video{_suffix(self.name, self.media_type)}"
        path.write_bytes(self.data)
        self.capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        if not self.capture.isOpened():
            self.__exit__()
            raise ToolError(f"could not decode video {self.name!r} ({self.media_type or 'no media type'}, "
                            f"{len(self.data)} bytes): not a container/codec this agent's OpenCV can read")
        fps = float(self.capture.get(cv2.CAP_PROP_FPS))
        if not math.isfinite(fps) or not 0.0 < fps <= 1000.0:
            self.__exit__()
            raise ToolError(f"video {self.name!r} has no usable frame rate ({fps:g} frames/s)")
        return self.capture, fps

    def __exit__(self, *_: object) -> None:
        if self.capture is not None:
            self.capture.release()
            self.capture = None
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None


def _suffix(name: str, media_type: str) -> str:
    """A file suffix that helps FFmpeg pick a demuxer (it also probes content, so a wrong one is harmless)."""
    suffix = Path(name).suffix
    if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix):
        return suffix.lower()
    by_type = {"video/mp4": ".mp4", "video/x-msvideo": ".avi", "video/avi": ".avi", "video/webm": ".webm",
               "video/x-matroska": ".mkv", "video/quicktime": ".mov", "video/mpeg": ".mpg"}
    return by_type.get(media_type.split(";")[0].strip().lower(), ".bin")


def _frames(capture: Any, keep: Callable[[int], bool], stop_after: int | None = None) -> Iterator[tuple[int, Any]]:
    """Yield (index, frame) for every decoded frame, the frame only where ``keep(index)`` (else None).

    Frames not kept are only grabbed, not converted, which is the cheap half of decoding. Stops at the
    end of the video, after ``stop_after``, or with a ToolError past MAX_FRAMES or MAX_DECODE_S.
    """
    started_s = time.monotonic()
    index = 0
    while stop_after is None or index <= stop_after:
        if index >= MAX_FRAMES:
            raise ToolError(f"video is longer than {MAX_FRAMES} frames; cut it into shorter clips")
        if index % 64 == 0 and time.monotonic() - started_s > MAX_DECODE_S:
            raise ToolError(f"decoding the video took longer than {MAX_DECODE_S:g} s (stopped at frame {index})")
        if not capture.grab():
            return
        if keep(index):
            ok, frame = capture.retrieve()
            yield index, frame if ok else None
        else:
            yield index, None
        index += 1


def _histogram(cv2: Any, frame: Any) -> Any:
    height, width = frame.shape[:2]
    if width > _HIST_WIDTH:
        frame = cv2.resize(frame, (_HIST_WIDTH, max(1, round(height * _HIST_WIDTH / width))),
                           interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(frame, cv2.COLOR_BGR2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, _HIST_BINS, _HIST_RANGES)
    cv2.normalize(hist, hist, alpha=1.0, norm_type=cv2.NORM_L1)
    return hist


def _scenes(raw: list[Any]) -> list[tuple[float, float]]:
    """(start_s, end_s) per scene, checked: scenes may come from any scene-detection executor."""
    if not raw:
        raise ToolError("input 'scenes' is empty: there is no scene to take frames from")
    scenes = []
    for i, scene in enumerate(raw):
        if not isinstance(scene, dict):
            raise ToolError(f"scenes[{i}]: expected a scene {{index, start_s, end_s}}")
        bounds = []
        for field in ("start_s", "end_s"):
            value = scene.get(field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ToolError(f"scenes[{i}].{field}: expected a finite number of seconds")
            bounds.append(float(value))
        start_s, end_s = bounds
        if start_s < 0 or end_s <= start_s:
            raise ToolError(f"scenes[{i}]: needs 0 <= start_s < end_s, got start_s={start_s:g}, end_s={end_s:g}")
        scenes.append((start_s, end_s))
    return scenes


def _frame_numbers(scenes: list[tuple[float, float]], budget: int, fps: float) -> set[int]:
    """The frame numbers to extract: ``budget`` spread over scenes as extract_frames describes."""
    spans = [(max(0, math.floor(start * fps + 1e-6)), max(1, math.ceil(end * fps - 1e-6))) for start, end in scenes]
    lengths = [max(1, last - first) for first, last in spans]
    counts = [0] * len(scenes)
    by_length = sorted(range(len(scenes)), key=lambda i: (-lengths[i], i))
    for i in by_length[:budget]:
        counts[i] = 1
    spare = budget - sum(counts)
    if spare > 0:
        total = sum(lengths)
        shares = [spare * length / total for length in lengths]
        for i, share in enumerate(shares):
            counts[i] += math.floor(share)
        leftover = budget - sum(counts)
        for i in sorted(range(len(scenes)), key=lambda i: (-(shares[i] - math.floor(shares[i])), i))[:leftover]:
            counts[i] += 1
    wanted: set[int] = set()
    for (first, _), length, count in zip(spans, lengths, counts):
        chosen: set[int] = set()
        count = min(count, length)  # a scene cannot give more distinct frames than it has
        j = 1
        while len(chosen) < count and j <= 4 * length:  # 4 * length positions cover every frame
            chosen.add(first + math.floor(_van_der_corput(j) * length))
            j += 1
        wanted |= chosen
    return wanted


def _van_der_corput(j: int) -> float:
    """1/2, 1/4, 3/4, 1/8, 5/8, ...: each next position halves the largest gap, starting at the middle."""
    position, scale = 0.0, 0.5
    while j:
        position += scale * (j & 1)
        j >>= 1
        scale /= 2
    return position
