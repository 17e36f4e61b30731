"""Readers for recorded request traces: per-request files and rate curves, as typed numpy arrays.

Two formats (docs/traces.md):

- a **requests file** (the Azure LLM inference trace format): a header ``TIMESTAMP`` with optional
  ``ContextTokens`` and ``GeneratedTokens`` columns, then one row per request. A timestamp is an
  ISO date-time (``2023-11-16 18:15:46.6805900``) or a number of seconds; times must not go backwards.
- a **rate file** (derived from ServeGen): a header ``window_start_s,rate_rps`` with an optional
  ``arrival_cv`` column, then one row per window; window starts strictly increase, the last window is
  as long as the one before it.

A bad file raises ``TraceFileError`` naming the file and the 1-based line, so a scenario author can
fix it directly; the scenario loader reports it as a ``ScenarioError``. Readers are cached per file
(path, size and modification time), and their arrays are read-only so the cache cannot be corrupted.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import numpy as np

REQUEST_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
RATE_COLUMNS = ("window_start_s", "rate_rps", "arrival_cv")
MAX_TOKENS = 2**31 - 1  # token counts are stored as int32


class TraceFileError(ValueError):
    """A trace file that cannot be used, with the file and (where it applies) the line."""

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        super().__init__(f"{self.path}:{line}: {message}" if line is not None else f"{self.path}: {message}")


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@dataclass(frozen=True)
class RequestTrace:
    """One request per row: arrival times from the first request, and token counts (0 where not given)."""

    path: str
    times_s: np.ndarray  # float64, seconds since the first request, non-decreasing, times_s[0] == 0
    context_tokens: np.ndarray  # int32
    generated_tokens: np.ndarray  # int32

    @property
    def requests(self) -> int:
        return int(self.times_s.size)

    @property
    def span_s(self) -> float:
        """First to last request."""
        return float(self.times_s[-1]) if self.times_s.size else 0.0

    @property
    def period_s(self) -> float:
        """Length of one tile when the trace repeats: its span plus one mean gap, so the rate stays the trace's."""
        if self.requests < 2 or self.span_s <= 0:
            raise TraceFileError(self.path, "needs at least two requests at different times to repeat")
        return self.span_s * self.requests / (self.requests - 1)

    @property
    def mean_gap_s(self) -> float:
        return self.span_s / (self.requests - 1) if self.requests > 1 else 0.0


@dataclass(frozen=True)
class RateCurve:
    """Aggregate request rate per window, with the burstiness of arrivals inside it."""

    path: str
    window_start_s: np.ndarray  # float64, strictly increasing
    window_end_s: np.ndarray  # float64, the next window's start (the last: as long as the one before)
    rate_rps: np.ndarray  # float64, >= 0
    arrival_cv: np.ndarray  # float64, >= 0; NaN where the file gives none

    @property
    def windows(self) -> int:
        return int(self.rate_rps.size)

    def covering(self, start_s: float, end_s: float) -> np.ndarray:
        """Indexes of the windows overlapping [start_s, end_s); an error unless they cover all of it."""
        first, last = float(self.window_start_s[0]), float(self.window_end_s[-1])
        if start_s < first or end_s > last + 1e-9:
            raise TraceFileError(self.path, f"windows cover {first:g}..{last:g} s, not the requested "
                                            f"{start_s:g}..{end_s:g} s (start_s + the scenario's duration)")
        return np.flatnonzero((self.window_end_s > start_s) & (self.window_start_s < end_s))


def trace_path(base_dir: str | Path, name: str | Path) -> Path:
    """A trace file named in a scenario: relative to the scenario file's folder unless absolute."""
    path = Path(name)
    return path if path.is_absolute() else Path(base_dir) / path


def _resolved(path: str | Path) -> tuple[Path, int, int]:
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise TraceFileError(path, f"cannot read the trace file: {exc.strerror or exc}") from None
    if not path.is_file():
        raise TraceFileError(path, "not a file")
    return path, stat.st_size, stat.st_mtime_ns


def _rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank line, the header included."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            rows = [(reader.line_num, [f.strip() for f in row]) for row in reader if any(f.strip() for f in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TraceFileError(path, f"cannot read the trace file: {exc}") from None
    if not rows:
        raise TraceFileError(path, "the file is empty (expected a header line)", 1)
    return rows


def _header(path: Path, line: int, fields: list[str], required: tuple[str, ...],
            optional: tuple[str, ...]) -> list[str]:
    known = {c.lower(): c for c in required + optional}
    names = [known.get(f.lower(), f) for f in fields]
    unknown = [f for f in names if f not in known.values()]
    missing = [c for c in required if c not in names]
    if unknown or missing or len(set(names)) != len(names):
        raise TraceFileError(path, f"expected a header with {', '.join(required)} (optional: {', '.join(optional)}), "
                                   f"got {','.join(fields)!r}", line)
    return names


def _number(path: Path, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TraceFileError(path, f"{column}: not a number: {text!r}", line) from None
    if not math.isfinite(value):
        raise TraceFileError(path, f"{column}: not a finite number: {text!r}", line)
    return value


def _timestamp(path: Path, line: int, text: str) -> float:
    """Seconds: a plain number, or an ISO date-time (read to the microsecond)."""
    try:
        value = float(text)
    except ValueError:
        try:
            stamp = datetime.fromisoformat(text)
        except ValueError:
            raise TraceFileError(path, f"TIMESTAMP: neither seconds nor a date-time: {text!r}", line) from None
        epoch = datetime(1970, 1, 1, tzinfo=timezone.utc if stamp.tzinfo else None)
        return (stamp - epoch).total_seconds()
    if not math.isfinite(value):
        raise TraceFileError(path, f"TIMESTAMP: not a finite number: {text!r}", line)
    return value


def read_request_file(path: str | Path) -> RequestTrace:
    """Read a per-request trace (cached per file version)."""
    return _read_request_file(*_resolved(path))


@lru_cache(maxsize=16)
def _read_request_file(path: Path, _size: int, _mtime_ns: int) -> RequestTrace:
    rows = _rows(path)
    names = _header(path, rows[0][0], rows[0][1], REQUEST_COLUMNS[:1], REQUEST_COLUMNS[1:])
    n = len(rows) - 1
    times = np.empty(n)
    tokens = {c: np.zeros(n, dtype=np.int32) for c in REQUEST_COLUMNS[1:]}
    previous = -math.inf
    for i, (line, fields) in enumerate(rows[1:]):
        if len(fields) != len(names):
            raise TraceFileError(path, f"expected {len(names)} columns ({','.join(names)}), got {len(fields)}", line)
        for column, text in zip(names, fields):
            if column == "TIMESTAMP":
                times[i] = _timestamp(path, line, text)
                if times[i] < previous:
                    raise TraceFileError(path, f"TIMESTAMP: {text} is before the previous request's", line)
                previous = times[i]
                continue
            value = _number(path, line, column, text)
            if value < 0 or value != int(value) or value > MAX_TOKENS:
                raise TraceFileError(path, f"{column}: expected a whole number of tokens >= 0, got {text!r}", line)
            tokens[column][i] = int(value)
    if n == 0:
        raise TraceFileError(path, "no requests after the header", rows[0][0])
    return RequestTrace(path=str(path), times_s=_frozen(times - times[0]),
                        context_tokens=_frozen(tokens["ContextTokens"]),
                        generated_tokens=_frozen(tokens["GeneratedTokens"]))


def read_rate_file(path: str | Path) -> RateCurve:
    """Read a rate curve (cached per file version)."""
    return _read_rate_file(*_resolved(path))


@lru_cache(maxsize=16)
def _read_rate_file(path: Path, _size: int, _mtime_ns: int) -> RateCurve:
    rows = _rows(path)
    names = _header(path, rows[0][0], rows[0][1], RATE_COLUMNS[:2], RATE_COLUMNS[2:])
    n = len(rows) - 1
    values = {c: np.full(n, math.nan) for c in RATE_COLUMNS}
    for i, (line, fields) in enumerate(rows[1:]):
        if len(fields) != len(names):
            raise TraceFileError(path, f"expected {len(names)} columns ({','.join(names)}), got {len(fields)}", line)
        for column, text in zip(names, fields):
            if column == "arrival_cv" and text == "":
                continue  # no burstiness given: Poisson
            value = _number(path, line, column, text)
            if column != "window_start_s" and value < 0:
                raise TraceFileError(path, f"{column}: must not be negative, got {text}", line)
            values[column][i] = value
        if i > 0 and values["window_start_s"][i] <= values["window_start_s"][i - 1]:
            raise TraceFileError(path, f"window_start_s: {fields[names.index('window_start_s')]} does not come after "
                                       f"the previous window's start", line)
    if n == 0:
        raise TraceFileError(path, "no windows after the header", rows[0][0])
    starts = values["window_start_s"]
    if n == 1:
        raise TraceFileError(path, "needs at least two windows (the last window is as long as the one before)",
                             rows[1][0])
    ends = np.append(starts[1:], starts[-1] + (starts[-1] - starts[-2]))
    return RateCurve(path=str(path), window_start_s=_frozen(starts), window_end_s=_frozen(ends),
                     rate_rps=_frozen(values["rate_rps"]), arrival_cv=_frozen(values["arrival_cv"]))
