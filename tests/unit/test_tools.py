"""Tool executors on real inputs: OpenCV on generated videos, cosine retrieval, the code sandbox, ranking."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.tools import documents as documents_module
from agent.tools.base import ToolError, float_knob, int_knob
from agent.tools.documents import load_documents
from agent.tools.rank import rank_candidates
from agent.tools.retrieve import retrieve
from agent.tools.sandbox import execute_code
from agent.tools.testdata import DEFAULT_CORPUS, file_blob, make_corpus_jsonl, make_test_video
from agent.tools.video import detect_scenes, extract_frames
from tests.unit.test_sandbox_hostile import require_bubblewrap

RED, GREEN, BLUE = (200, 30, 30), (30, 170, 60), (40, 60, 210)


def corpus(text: str) -> dict[str, Any]:
    return {"corpus": {"name": "corpus.jsonl", "media_type": "application/jsonl", "data": text.encode()}}


# --- load-documents ---------------------------------------------------------------------------------------


def test_load_documents_reads_the_generated_corpus_in_order(tmp_path: Path) -> None:
    out = load_documents({"corpus": file_blob(make_corpus_jsonl(tmp_path / "c.jsonl"))}, {})
    assert out["documents"] == [{"id": d["id"], "text": d["text"]} for d in DEFAULT_CORPUS]
    assert out["texts"] == [d["text"] for d in DEFAULT_CORPUS]


def test_load_documents_skips_blank_lines_converts_integer_ids_and_ignores_extra_fields() -> None:
    text = '\n{"id": 7, "text": "seven"}\r\n   \n{"id": "b", "text": "bee\\u2028line", "lang": "en"}\n\n'
    out = load_documents(corpus(text), {})
    assert out["documents"] == [{"id": "7", "text": "seven"}, {"id": "b", "text": "bee\u2028line"}]
    assert out["texts"] == ["seven", "bee\u2028line"]


@pytest.mark.parametrize(("text", "message"), [
    ('{"id": "a", "text": "x"}\n{"id": "b" "text": "y"}', r"corpus line 2: not JSON: Expecting ',' delimiter"),
    ('["a", "x"]', r"corpus line 1: expected an object"),
    ('{"text": "x"}', r"corpus line 1: missing field 'id'"),
    ('{"id": "a"}', r"corpus line 1: missing field 'text'"),
    ('{"id": true, "text": "x"}', r"corpus line 1: id must be text or an integer"),
    ('{"id": 1.5, "text": "x"}', r"corpus line 1: id must be text or an integer, got float"),
    ('{"id": " ", "text": "x"}', r"corpus line 1: id is empty"),
    ('{"id": "a", "text": 3}', r"corpus line 1: text must be a string"),
    ('{"id": "a", "text": "  "}', r"corpus line 1: text is empty"),
    ('{"id": "a", "text": "x"}\n\n{"id": "a", "text": "y"}',
     r"corpus line 3: duplicate id 'a' \(first used on line 1\)"),
    ('{"id": 1, "text": "x"}\n{"id": "1", "text": "y"}', r"corpus line 2: duplicate id '1'"),
    ("\n \n", r"corpus has no documents"),
    ("[" * 100_000, r"corpus line 1: (JSON nested too deeply|not JSON)"),
])
def test_load_documents_rejects_bad_corpora_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(ToolError, match=message):
        load_documents(corpus(text), {})


def test_load_documents_rejects_non_utf8_missing_input_and_non_blobs() -> None:
    bad = {"corpus": {"name": "c", "media_type": "", "data": b'{"id": "a", "text": "x"}\n{"id": "\xff"}'}}
    with pytest.raises(ToolError, match=r"corpus line 2: not UTF-8"):
        load_documents(bad, {})
    with pytest.raises(ToolError, match=r"missing input 'corpus'"):
        load_documents({}, {})
    with pytest.raises(ToolError, match=r"input 'corpus': expected a blob"):
        load_documents({"corpus": "just text"}, {})


def test_load_documents_enforces_the_document_and_byte_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(documents_module, "MAX_DOCUMENTS", 2)
    lines = "".join(json.dumps({"id": i, "text": f"t{i}"}) + "\n" for i in range(3))
    with pytest.raises(ToolError, match=r"corpus line 3: more than 2 documents"):
        load_documents(corpus(lines), {})
    monkeypatch.setattr(documents_module, "MAX_CORPUS_BYTES", 10)
    with pytest.raises(ToolError, match=r"more than the limit of 10 bytes"):
        load_documents(corpus(lines), {})


# --- retrieve ---------------------------------------------------------------------------------------------


def bag_of_words(text: str, vocabulary: list[str]) -> list[float]:
    words = re.findall(r"[a-z]+", text.lower())
    return [float(words.count(w)) for w in vocabulary]


def test_retrieve_ranks_the_relevant_passage_first() -> None:
    docs = load_documents(corpus("".join(json.dumps(d) + "\n" for d in DEFAULT_CORPUS)), {})
    vocabulary = sorted({w for t in docs["texts"] for w in re.findall(r"[a-z]+", t.lower())})
    inputs = {"query": bag_of_words("What causes the tides of the oceans?", vocabulary),
              "embeddings": [bag_of_words(t, vocabulary) for t in docs["texts"]], "documents": docs["documents"]}
    out = retrieve(inputs, {})
    assert [p["id"] for p in out["passages"]][0] == "tides"
    assert len(out["passages"]) == 3  # top_k defaults to 3
    scores = [p["score"] for p in out["passages"]]
    assert scores == sorted(scores, reverse=True) and all(type(s) is float for s in scores)
    by_id = {d["id"]: d["text"] for d in docs["documents"]}
    assert out["texts"] == [by_id[p["id"]] for p in out["passages"]]
    one = retrieve(inputs, {"top_k": 1})
    assert one["passages"] == out["passages"][:1] and one["texts"] == out["texts"][:1]
    assert len(retrieve(inputs, {"top_k": 50})["passages"]) == len(DEFAULT_CORPUS)


def test_retrieve_scores_are_cosines_and_ties_keep_corpus_order() -> None:
    documents = [{"id": i, "text": i.upper()} for i in "abcd"]
    out = retrieve({"query": [1.0, 0.0], "embeddings": [[1, 1], [0, 2], [3, 3], [2, 0]], "documents": documents},
                   {"top_k": 4})
    assert out["passages"] == [{"id": "d", "score": 1.0}, {"id": "a", "score": 0.707107},
                               {"id": "c", "score": 0.707107}, {"id": "b", "score": 0.0}]
    assert out["texts"] == ["D", "A", "C", "B"]


@pytest.mark.parametrize(("inputs", "knobs", "message"), [
    ({"query": [1, 0, 0], "embeddings": [[1, 0]], "documents": [{"id": "a", "text": "A"}]}, {},
     r"embeddings\[0\] has 2 dimensions but the query has 3"),
    ({"query": [1, 0], "embeddings": [[1, 0]], "documents": [{"id": "a", "text": "A"}] * 2}, {},
     r"got 1 embeddings for 2 documents"),
    ({"query": [1, 0], "embeddings": [[1, 0], [0, 0]], "documents": [{"id": "a", "text": "A"},
                                                                       {"id": "b", "text": "B"}]}, {},
     r"embeddings\[1\] \(document 'b'\) is a zero vector"),
    ({"query": [0, 0], "embeddings": [[1, 0]], "documents": [{"id": "a", "text": "A"}]}, {}, r"query is a zero vector"),
    ({"query": [1, "x"], "embeddings": [[1, 0]], "documents": [{"id": "a", "text": "A"}]}, {},
     r"query\[1\]: expected a finite number"),
    ({"query": [1, 0], "embeddings": [[1, float("nan")]], "documents": [{"id": "a", "text": "A"}]}, {},
     r"embeddings\[0\]\[1\]: expected a finite number"),
    ({"query": [], "embeddings": [], "documents": []}, {}, r"query: expected a non-empty list"),
    ({"query": [1], "embeddings": [], "documents": []}, {}, r"no documents to retrieve from"),
    ({"query": [1], "embeddings": [[1]], "documents": ["a"]}, {}, r"documents\[0\]: expected a document"),
    ({"query": [1], "embeddings": [[1]]}, {}, r"missing input 'documents'"),
    ({"query": [1], "embeddings": [[1]], "documents": [{"id": "a", "text": "A"}]}, {"top_k": 0},
     r"knob 'top_k': 0 is outside the allowed range 1\.\.10000"),
    ({"query": [1], "embeddings": [[1]], "documents": [{"id": "a", "text": "A"}]}, {"top_k": True},
     r"knob 'top_k': expected an integer"),
])
def test_retrieve_rejects_inconsistent_inputs(inputs: dict[str, Any], knobs: dict[str, Any], message: str) -> None:
    with pytest.raises(ToolError, match=message):
        retrieve(inputs, knobs)


# --- scene-detection and frame-extraction -----------------------------------------------------------------


@pytest.fixture(scope="module")
def three_scene_video(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return file_blob(make_test_video(tmp_path_factory.mktemp("video") / "three.mp4", [RED, GREEN, BLUE]))


def test_detect_scenes_finds_the_three_colored_scenes(three_scene_video: dict[str, Any]) -> None:
    scenes = detect_scenes({"video": three_scene_video}, {})["scenes"]
    assert scenes == [{"index": 0, "start_s": 0.0, "end_s": 1.0}, {"index": 1, "start_s": 1.0, "end_s": 2.0},
                      {"index": 2, "start_s": 2.0, "end_s": 3.0}]


def test_detect_scenes_reads_mjpeg_avi_and_tells_black_from_white(tmp_path: Path) -> None:
    video = file_blob(make_test_video(tmp_path / "bw.avi", [(0, 0, 0), (255, 255, 255), (128, 128, 128)],
                                      seconds_per_scene=0.8, fps=10))
    assert video["media_type"] == "video/x-msvideo"
    scenes = detect_scenes({"video": video}, {})["scenes"]
    assert [(s["start_s"], s["end_s"]) for s in scenes] == [(0.0, 0.8), (0.8, 1.6), (1.6, 2.4)]


def test_detect_scenes_knobs_threshold_and_min_scene_length(tmp_path: Path) -> None:
    video = {"video": file_blob(make_test_video(tmp_path / "short.mp4", [RED, GREEN, BLUE, GREEN],
                                                seconds_per_scene=0.3, fps=10))}
    assert len(detect_scenes(video, {"min_scene_s": 0})["scenes"]) == 4
    assert len(detect_scenes(video, {})["scenes"]) == 2  # cuts 0.3 s apart: only every other one is kept
    assert len(detect_scenes(video, {"threshold": 1.0, "min_scene_s": 0})["scenes"]) == 1
    one = detect_scenes({"video": file_blob(make_test_video(tmp_path / "one.mp4", [RED]))}, {})["scenes"]
    assert one == [{"index": 0, "start_s": 0.0, "end_s": 1.0}]


def mean_rgb(image: dict[str, Any]) -> np.ndarray:
    frame = cv2.imdecode(np.frombuffer(image["data"], np.uint8), cv2.IMREAD_COLOR)
    assert frame is not None, f"{image['name']} is not a decodable JPEG"
    return np.median(frame.reshape(-1, 3), axis=0)[::-1]  # median ignores the moving square


def test_extract_frames_takes_scene_middles_first_and_spreads_the_rest(three_scene_video: dict[str, Any]) -> None:
    scenes = detect_scenes({"video": three_scene_video}, {})["scenes"]
    three = extract_frames({"video": three_scene_video, "scenes": scenes}, {"frames": 3})["frames"]
    assert [f["name"] for f in three] == ["frame-0005.jpg", "frame-0015.jpg", "frame-0025.jpg"]
    assert all(f["media_type"] == "image/jpeg" and f["data"][:2] == b"\xff\xd8" for f in three)
    for image, color in zip(three, [RED, GREEN, BLUE]):
        assert np.abs(mean_rgb(image) - np.array(color)).max() < 30, image["name"]
    eight = extract_frames({"video": three_scene_video, "scenes": scenes}, {})["frames"]  # frames defaults to 8
    numbers = [int(f["name"][6:10]) for f in eight]
    assert len(eight) == 8 and numbers == sorted(numbers)
    assert {n // 10 for n in numbers} == {0, 1, 2} and {5, 15, 25} <= set(numbers)
    two = extract_frames({"video": three_scene_video, "scenes": scenes}, {"frames": 2})["frames"]
    assert [f["name"] for f in two] == ["frame-0005.jpg", "frame-0015.jpg"]
    every = extract_frames({"video": three_scene_video, "scenes": scenes}, {"frames": 100})["frames"]
    assert [f["name"] for f in every] == [f"frame-{i:04d}.jpg" for i in range(30)]  # no frame twice


@pytest.mark.parametrize(("video", "message"), [
    ({"name": "x.mp4", "media_type": "video/mp4", "data": b"\x00\x01not a video" * 500},
     r"could not decode video 'x.mp4'"),
    ({"name": "x.mp4", "media_type": "video/mp4", "data": b""}, r"video 'x.mp4' is empty"),
    ("video.mp4", r"input 'video': expected a blob"),
])
def test_scene_detection_rejects_undecodable_video(video: Any, message: str) -> None:
    with pytest.raises(ToolError, match=message):
        detect_scenes({"video": video}, {})


def test_scene_detection_rejects_a_truncated_file(three_scene_video: dict[str, Any]) -> None:
    cut = dict(three_scene_video, data=three_scene_video["data"][:300])
    with pytest.raises(ToolError, match=r"could not decode video"):
        detect_scenes({"video": cut}, {})


@pytest.mark.parametrize(("scenes", "knobs", "message"), [
    ([], {}, r"input 'scenes' is empty"),
    ([{"index": 0, "start_s": 1.0, "end_s": 1.0}], {}, r"scenes\[0\]: needs 0 <= start_s < end_s"),
    ([{"index": 0, "start_s": "0", "end_s": 1.0}], {}, r"scenes\[0\]\.start_s: expected a finite number"),
    ([7], {}, r"scenes\[0\]: expected a scene"),
    ([{"index": 0, "start_s": 50.0, "end_s": 60.0}], {}, r"the scenes lie outside the video"),
    ([{"index": 0, "start_s": 0.0, "end_s": 1.0}], {"frames": 0}, r"knob 'frames': 0 is outside the allowed range"),
    ([{"index": 0, "start_s": 0.0, "end_s": 1.0}], {"frames": "many"}, r"knob 'frames': expected an integer"),
])
def test_extract_frames_rejects_bad_scenes_and_knobs(three_scene_video: dict[str, Any], scenes: list[Any],
                                                     knobs: dict[str, Any], message: str) -> None:
    with pytest.raises(ToolError, match=message):
        extract_frames({"video": three_scene_video, "scenes": scenes}, knobs)


def test_scene_detection_rejects_bad_knobs(three_scene_video: dict[str, Any]) -> None:
    with pytest.raises(ToolError, match=r"knob 'threshold': 1\.5 is outside the allowed range 0\.\.1"):
        detect_scenes({"video": three_scene_video}, {"threshold": 1.5})


# --- code-execution ---------------------------------------------------------------------------------------

ADD_TESTS = "assert add(1, 2) == 3\nassert add(2, 2) == 4\nassert add(-1, 1) == 0\n"


def run_code(code: str, tests: str = ADD_TESTS, **knobs: Any) -> dict[str, Any]:
    return execute_code({"code": code, "tests": tests}, knobs)["result"]


@pytest.fixture(params=["bubblewrap", "rlimits"])
def sandbox(request: pytest.FixtureRequest) -> str:
    """Each behaviour holds in both modes; hostile candidates are in test_sandbox_hostile.py."""
    if request.param == "bubblewrap":
        require_bubblewrap()
    return str(request.param)


def test_sandbox_good_code_passes_every_test(sandbox: str) -> None:
    result = run_code("def add(a, b):\n    return a + b\n", sandbox=sandbox)
    assert result["passed"] is True and result["error"] == ""
    assert (result["passed_tests"], result["total_tests"]) == (3, 3)
    assert 0 <= result["runtime_s"] < 5


def test_sandbox_counts_each_test_separately_and_reports_the_first_failure(sandbox: str) -> None:
    result = run_code("def add(a, b):\n    return a * b\n", sandbox=sandbox)
    assert (result["passed"], result["passed_tests"], result["total_tests"]) == (False, 1, 3)
    assert result["error"] == "test 1 of 3 failed: assert add(1, 2) == 3"
    raising = run_code("def add(a, b):\n    return a + b if a > 0 else 1 / 0\n", sandbox=sandbox)
    assert raising["passed_tests"] == 2
    assert raising["error"] == "test 3 of 3 raised ZeroDivisionError: division by zero: assert add(-1, 1) == 0"
    setup = run_code("def add(a, b):\n    return a + b\n",
                     "import math\nassert add(1, 1) == 2\nassert math.isclose(0.1 + 0.2, 0.3)\n", sandbox=sandbox)
    assert setup["passed"] is True and setup["total_tests"] == 2


@pytest.mark.parametrize(("code", "message"), [
    ("def add(a, b)\n    return a + b\n", r"^SyntaxError: expected ':' \(line 1\)$"),
    ("import sys\nsys.exit(3)\n", r"^SystemExit: the program called exit\(3\)$"),
    ("import os\ndef add(a, b):\n    os._exit(0)\n", r"^the program exited with status 0 before the tests finished "
                                                    r"while running test 1 of 3: assert add\(1, 2\) == 3$"),
    ("import os\nos.fork()\n", r"^PermissionError: creating processes is not allowed in the sandbox$"),
    ("import subprocess\nsubprocess.run(['true'])\n", r"^PermissionError: creating processes is not allowed"),
    ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", r"^PermissionError: signalling other processes"),
    ("with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * 2**20)\n",
     r"^OSError: \[Errno 27\] File too large \(the sandbox allows files up to 16 MiB\)$"),
    ("x = bytearray(2**30)\n", r"^MemoryError: out of memory \(the sandbox allows 256 MiB\)$"),
    ("x = []\nwhile True:\n    x.append(bytearray(2**20))\n", r"^MemoryError: out of memory"),
    ("input()\n", r"^EOFError"),
])
def test_sandbox_turns_misbehaving_code_into_a_failed_result(code: str, message: str, sandbox: str) -> None:
    result = run_code(code, sandbox=sandbox)
    assert result["passed"] is False and result["passed_tests"] == 0 and result["total_tests"] == 3
    assert re.search(message, result["error"]), result["error"]


def test_sandbox_memory_limit_follows_the_knob(sandbox: str) -> None:
    code = "def add(a, b):\n    block = bytearray(200 * 2**20)\n    return a + b\n"
    assert run_code(code, sandbox=sandbox)["passed"] is True  # 200 MiB fits under the default 256 MiB
    small = run_code(code, memory_bytes=128 * 2**20, sandbox=sandbox)
    assert small["passed_tests"] == 0 and "the sandbox allows 128 MiB" in small["error"]


def test_sandbox_stops_an_infinite_loop_at_the_deadline_and_keeps_earlier_results(sandbox: str) -> None:
    started = time.monotonic()
    result = run_code("def add(a, b):\n    while a < 0:\n        pass\n    return a + b\n", timeout_s=1.0,
                      sandbox=sandbox)
    assert time.monotonic() - started < 4.0
    assert (result["passed"], result["passed_tests"]) == (False, 2)
    assert result["error"] == "timed out after 1 s while running test 3 of 3: assert add(-1, 1) == 0"
    assert result["runtime_s"] >= 1.0


def test_sandbox_keeps_the_first_error_and_says_how_the_run_ended(sandbox: str) -> None:
    result = run_code("import time\ndef add(a, b):\n    if a == 2:\n        time.sleep(60)\n    return a\n",
                      timeout_s=1.0, sandbox=sandbox)
    assert result["error"] == ("test 1 of 3 failed: assert add(1, 2) == 3; then timed out after 1 s "
                               "while running test 2 of 3: assert add(2, 2) == 4")


def test_sandbox_rlimits_mode_isolates_environment_limits_and_working_directory() -> None:
    probe = """
import os, resource, sys
assert sorted(os.environ) in (["LANG", "PATH"], ["LANG", "LC_CTYPE", "PATH"]), sorted(os.environ)
assert sys.flags.isolated == 1
assert resource.getrlimit(resource.RLIMIT_AS) == (256 * 2**20, 256 * 2**20)
assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == 16 * 2**20
assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 64
assert resource.getrlimit(resource.RLIMIT_CPU)[0] == 6
assert resource.getrlimit(resource.RLIMIT_NPROC) == (0, 0)
assert os.getpgid(0) == os.getpid() and os.getsid(0) == os.getpid()
assert False, os.getcwd()
"""
    result = run_code("", probe, sandbox="rlimits")  # bubblewrap: test_sandbox_hostile.py
    assert result["passed_tests"] == 9, result["error"]
    work_dir = re.search(r"\(AssertionError: (.+)\)$", result["error"])
    assert work_dir is not None and "murakkab-sandbox-" in work_dir.group(1)
    assert not Path(work_dir.group(1)).exists()  # removed after the run


def test_sandbox_survives_an_output_flood(sandbox: str) -> None:
    result = run_code("def add(a, b):\n    for _ in range(20000):\n        print('spam' * 50)\n    return a + b\n",
                      sandbox=sandbox)
    assert result["passed"] is True


@pytest.mark.parametrize(("inputs", "knobs", "message"), [
    ({"code": "x = 1", "tests": "assert x ==\n"}, {}, r"tests line 1: not valid Python"),
    ({"code": "x = 1", "tests": "x = 2\nprint(x)\n"}, {}, r"tests contain no top-level assert statements"),
    ({"code": "x = 1", "tests": "assert x\x00"}, {}, r"^tests: not valid Python"),
    ({"code": 5, "tests": "assert True"}, {}, r"input 'code': expected text"),
    ({"tests": "assert True"}, {}, r"missing input 'code'"),
    ({"code": "", "tests": "assert True"}, {"timeout_s": 0}, r"knob 'timeout_s': 0 is outside the allowed range"),
    ({"code": "", "tests": "assert True"}, {"memory_bytes": 1024}, r"knob 'memory_bytes': 1024 is outside"),
    ({"code": "", "tests": "assert True"}, {"sandbox": "docker"}, r"knob 'sandbox': expected one of bubblewrap, "),
])
def test_sandbox_rejects_unusable_tests_and_knobs(inputs: dict[str, Any], knobs: dict[str, Any], message: str) -> None:
    with pytest.raises(ToolError, match=message):
        execute_code(inputs, knobs)


# --- rank-candidates --------------------------------------------------------------------------------------


def outcome(passed_tests: int, runtime_s: float, total: int = 3, error: str = "") -> dict[str, Any]:
    return {"passed": passed_tests == total, "passed_tests": passed_tests, "total_tests": total,
            "error": error, "runtime_s": runtime_s}


def test_rank_candidates_orders_by_passes_then_runtime_then_index() -> None:
    candidates = ["a", "b", "c", "d", "e"]
    results = [outcome(2, 0.1, error="test 3 of 3 failed"), outcome(3, 0.5), outcome(3, 0.2),
               outcome(0, 0.0, error="SyntaxError"), outcome(3, 0.2)]
    out = rank_candidates({"candidates": candidates, "results": results}, {})
    assert out["best"] == "c"
    assert [row["index"] for row in out["ranking"]] == [2, 4, 1, 0, 3]
    assert out["ranking"][3] == {"index": 0, "passed_tests": 2, "total_tests": 3, "runtime_s": 0.1,
                                 "error": "test 3 of 3 failed"}


def test_rank_candidates_with_no_candidates_has_no_best() -> None:
    assert rank_candidates({"candidates": [], "results": []}, {}) == {"best": "", "ranking": []}


def test_rank_candidates_ranks_real_sandbox_results(sandbox: str) -> None:
    candidates = ["def add(a, b):\n    return a * b\n", "def add(a, b):\n    return a + b\n", "def add(a, b)\n"]
    results = [run_code(code, sandbox=sandbox) for code in candidates]
    out = rank_candidates({"candidates": candidates, "results": results}, {})
    assert out["best"] == candidates[1] and [r["index"] for r in out["ranking"]] == [1, 0, 2]


@pytest.mark.parametrize(("inputs", "message"), [
    ({"candidates": ["a", "b"], "results": [outcome(1, 0.1)]}, r"got 2 candidates but 1 results"),
    ({"candidates": ["a"], "results": ["passed"]}, r"results\[0\]: expected a test_result"),
    ({"candidates": ["a"], "results": [outcome(4, 0.1)]}, r"results\[0\]: passed_tests 4 is more than total_tests 3"),
    ({"candidates": ["a"], "results": [dict(outcome(1, 0.1), passed_tests=True)]},
     r"results\[0\]\.passed_tests: expected a count"),
    ({"candidates": ["a"], "results": [outcome(1, -1.0)]}, r"results\[0\]\.runtime_s: expected a number"),
    ({"candidates": ["a"], "results": [dict(outcome(1, 0.1), error=None)]}, r"results\[0\]\.error: expected text"),
    ({"candidates": [3], "results": [outcome(1, 0.1)]}, r"candidates\[0\]: expected the program text"),
    ({"candidates": "a", "results": []}, r"input 'candidates': expected a list"),
])
def test_rank_candidates_rejects_mismatched_inputs(inputs: dict[str, Any], message: str) -> None:
    with pytest.raises(ToolError, match=message):
        rank_candidates(inputs, {})


# --- knob parsing -----------------------------------------------------------------------------------------


def test_knobs_accept_numeric_text_and_reject_the_rest() -> None:
    assert int_knob({"frames": "12"}, "frames", 8, 1, 64) == 12
    assert int_knob({"frames": 4.0}, "frames", 8, 1, 64) == 4
    assert int_knob({}, "frames", 8, 1, 64) == 8
    assert float_knob({"threshold": "0.25"}, "threshold", 0.5, 0, 1) == 0.25
    with pytest.raises(ToolError, match=r"knob 'frames': expected an integer, got number 2\.5"):
        int_knob({"frames": 2.5}, "frames", 8, 1, 64)
    with pytest.raises(ToolError, match=r"knob 'threshold': expected a number"):
        float_knob({"threshold": float("inf")}, "threshold", 0.5, 0, 1)
