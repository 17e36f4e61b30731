"""murakkabctl catalog/workflow/run/jobs/job/components: input conversion, SLOs, rendering, and the
commands end to end against a fake admin endpoint on loopback."""

from __future__ import annotations

import io
import json
import sys
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from rich.console import Console

from common.protocol import (
    ApplyCatalog, ApplyWorkflow, CancelJob, CatalogApplied, ComponentList, ComponentReport, ComponentView, ErrorReply,
    ExecutorList, ExecutorView, GetJob, GetWorkflow, InvocationView, JobAccepted, JobDetail, JobList, JobSummary,
    JobView, ListComponents, ListExecutors, ListJobs, SubmitJob, WorkflowApplied, WorkflowDetail, WorkflowSummary,
    decode, encode,
)
from controller.cli import workflows as wf
from controller.cli.main import main
from controller.cli.workflows import InputError


@pytest.fixture(autouse=True)
def _plaintext_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake controllers here are plaintext ROUTERs: murakkabctl talks to them with --insecure."""
    monkeypatch.setenv("MURAKKAB_INSECURE", "1")
    for name in ("MURAKKAB_KEY", "MURAKKAB_SERVER_KEY"):
        monkeypatch.delenv(name, raising=False)


TYPES = {"question": "text", "corpus": "file", "k": "integer", "temperature": "number", "verbose": "boolean",
         "config": "json", "docs": "list[document]", "frames": "list[image]", "query": "vector"}


def files(contents: dict[str, bytes]) -> Callable[[str, int], bytes]:
    """A file reader over an in-memory map, with the real reader's size check and message."""
    def read(path: str, limit_bytes: int) -> bytes:
        if path not in contents:
            raise InputError(f"cannot read {path!r}: No such file or directory")
        if len(contents[path]) > limit_bytes:
            raise InputError(f"{path!r} is {len(contents[path])} bytes, over the {limit_bytes // 1024} KiB limit")
        return contents[path]
    return read


READER = files({"q.txt": "héllo\nworld\n".encode(), "c.jsonl": b'{"id": "a", "text": "x"}\n',
                "frame.jpg": b"\xff\xd8\xff", "blob.weird": b"\x00\x01", "bad.txt": b"ok\xffno",
                "n.txt": b" 12\n", "cfg.json": b'{"a": [1, 2]}'})


# --- --input conversion ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, raw, expected", [
    ("question", "what is up?", "what is up?"),
    ("question", "a=b=c", "a=b=c"),
    ("question", "", ""),
    ("question", "@q.txt", "héllo\nworld\n"),  # text from a file keeps its whitespace
    ("question", "@@handle", "@handle"),  # @@ escapes a literal leading @
    ("k", "42", 42),
    ("k", "-7", -7),
    ("k", "@n.txt", 12),
    ("temperature", "0.5", 0.5),
    ("temperature", "3", 3),
    ("temperature", "1e-3", 0.001),
    ("verbose", "true", True),
    ("verbose", "FALSE", False),
    ("config", '{"x": [1, "y", null]}', {"x": [1, "y", None]}),
    ("config", "@cfg.json", {"a": [1, 2]}),
    ("config", "3", 3),
    ("docs", '[{"id": "1", "text": "t"}]', [{"id": "1", "text": "t"}]),
    ("query", "[0.1, 2, -3]", [0.1, 2, -3]),
    ("corpus", "@c.jsonl", {"name": "c.jsonl", "media_type": "application/octet-stream",
                            "data": b'{"id": "a", "text": "x"}\n'}),
    ("corpus", "@frame.jpg", {"name": "frame.jpg", "media_type": "image/jpeg", "data": b"\xff\xd8\xff"}),
    ("frames", "@frame.jpg", {"name": "frame.jpg", "media_type": "image/jpeg", "data": b"\xff\xd8\xff"}),
])
def test_inputs_convert_to_their_declared_types(name: str, raw: str, expected: Any) -> None:
    value = wf.convert_input(name, TYPES[name], raw, READER)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("name, raw, message", [
    ("k", "4.2", "input 'k' (integer): '4.2' is not an integer"),
    ("k", "1_000", "input 'k' (integer): '1_000' is not an integer"),
    ("k", "\u0663", "input 'k' (integer): '\u0663' is not an integer"),  # a non-ASCII digit
    ("k", "", "input 'k' (integer): '' is not an integer"),
    ("temperature", "fast", "input 'temperature' (number): 'fast' is not a finite number"),
    ("temperature", "inf", "input 'temperature' (number): 'inf' is not a finite number"),
    ("temperature", "1e999", "input 'temperature' (number): '1e999' is not a finite number"),
    ("verbose", "yes", "input 'verbose' (boolean): 'yes' is not true or false"),
    ("verbose", "1", "input 'verbose' (boolean): '1' is not true or false"),
    ("config", "{", "input 'config' (json): invalid JSON: Expecting property name enclosed in double quotes"),
    ("config", "NaN", "input 'config' (json): invalid JSON: NaN is not allowed"),
    ("docs", '[{"id": "1"}]', "input 'docs' (list[document]): docs[0]: a document has fields ['id', 'text'] "
                              "(missing ['text'], unexpected [])"),
    ("docs", '{"id": "1"}', "input 'docs' (list[document]): docs: expected list[document], got a map"),
    ("query", "[]", "input 'query' (vector): query: expected a non-empty vector of numbers"),
    ("corpus", "some text", "input 'corpus' (file): give a file, as corpus=@PATH"),
    ("corpus", "@", "input 'corpus' (file): give a file, as corpus=@PATH"),
    ("corpus", "@missing.jsonl", "input 'corpus' (file): cannot read 'missing.jsonl': No such file or directory"),
    ("question", "@missing.txt", "input 'question' (text): cannot read 'missing.txt': No such file or directory"),
    ("question", "@bad.txt", "input 'question' (text): 'bad.txt' is not UTF-8 text (byte 0xff at offset 2)"),
    ("k", "@q.txt", "input 'k' (integer): 'héllo\\nworld' is not an integer"),
])
def test_bad_input_values_are_explained(name: str, raw: str, message: str) -> None:
    with pytest.raises(InputError) as caught:
        wf.convert_input(name, TYPES[name], raw, READER)
    assert str(caught.value).startswith(message), str(caught.value)


def test_unknown_declared_type_is_reported_not_guessed() -> None:
    with pytest.raises(InputError, match="input 'x' has a type this murakkabctl does not know: unknown type 'frob'"):
        wf.convert_input("x", "frob", "1", READER)


@pytest.mark.parametrize("items, message", [
    (["question"], "--input 'question': use KEY=VALUE, or KEY=@FILE to read a file"),
    (["=x"], "--input '=x': use KEY=VALUE"),
    (["question=a", "colour=red", "size=2"],
     "workflow 'rag-qa' has no inputs colour, size (its inputs: corpus (file), question (text))"),
    (["corpus=@c.jsonl"], "missing required input question (text); pass --input question=VALUE"),
    ([], "missing required inputs corpus (file), question (text); pass --input corpus=VALUE or --input corpus=@FILE"),
    (["question=a", "question=b", "corpus=@c.jsonl"], "input 'question' given more than once"),
])
def test_unknown_missing_and_repeated_inputs_are_reported_before_sending(items: list[str], message: str) -> None:
    with pytest.raises(InputError) as caught:
        wf.build_inputs("rag-qa", items, {"question": "text", "corpus": "file"}, {"question", "corpus"}, READER)
    assert str(caught.value).startswith(message), str(caught.value)


def test_build_inputs_converts_every_input_and_collects_repeated_blobs_for_a_blob_list() -> None:
    types = {"question": "text", "frames": "list[image]", "top": "integer"}
    inputs = wf.build_inputs("w", ["question=@q.txt", "frames=@frame.jpg", "frames=@blob.weird"], types,
                             {"question", "frames"}, READER)
    assert inputs["question"] == "héllo\nworld\n" and "top" not in inputs
    assert [f["name"] for f in inputs["frames"]] == ["frame.jpg", "blob.weird"]
    assert inputs["frames"][1]["media_type"] == "application/octet-stream"


def test_inputs_over_the_total_limit_are_refused() -> None:
    reader = files({"a.bin": b"x" * 600, "b.bin": b"y" * 600})
    types = {"a": "file", "b": "file"}
    assert wf.build_inputs("w", ["a=@a.bin"], types, set(), reader, limit_bytes=1024)["a"]["data"] == b"x" * 600
    with pytest.raises(InputError, match=r"^the inputs come to \d+ bytes, over the 1 KiB limit for a job's inputs"):
        wf.build_inputs("w", ["a=@a.bin", "b=@b.bin"], types, set(), reader, limit_bytes=1024)
    with pytest.raises(InputError, match=r"^the inputs come to"):
        wf.build_inputs("w", ["a=" + "z" * 2000], {"a": "text"}, set(), reader, limit_bytes=1024)


def test_real_file_reader_refuses_a_file_over_the_limit_without_reading_it(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (wf.MAX_INPUT_BYTES + 1))
    with pytest.raises(InputError, match=f"is {wf.MAX_INPUT_BYTES + 1} bytes, over the 768 KiB limit"):
        wf.build_inputs("w", [f"f=@{big}"], {"f": "video"}, {"f"})
    small = tmp_path / "clip.mp4"
    small.write_bytes(b"\0\0\0 ftyp")
    value = wf.build_inputs("w", [f"f=@{small}"], {"f": "video"}, {"f"})["f"]
    assert value == {"name": "clip.mp4", "media_type": "video/mp4", "data": b"\0\0\0 ftyp"}
    with pytest.raises(InputError, match=r"cannot read '.*nope.txt': No such file or directory"):
        wf.build_inputs("w", [f"t=@{tmp_path / 'nope.txt'}"], {"t": "text"}, {"t"})


def test_required_inputs_respect_optional_and_defaulted_declarations() -> None:
    summary = WorkflowSummary("w", 1, "", 2, {"a": "text", "b": "integer", "c": "text"}, 0.0)
    spec = {"inputs": {"a": {"type": "text"}, "b": {"type": "integer", "default": 3},
                       "c": {"type": "text", "required": False}}}
    assert wf.required_inputs(WorkflowDetail(summary, "", spec)) == {"a"}
    assert wf.required_inputs(WorkflowDetail(summary, "", {"kind": "Workflow", "spec": spec})) == {"a"}
    assert wf.required_inputs(WorkflowDetail(summary, "", {})) == {"a", "b", "c"}


# --- --slo --------------------------------------------------------------------------------------------


def test_slo_parsing() -> None:
    assert wf.parse_slo([]) == {}
    assert wf.parse_slo(["accuracy:good", "Latency:BEST"]) == {"accuracy": "good", "latency": "best"}


@pytest.mark.parametrize("items, message", [
    (["accuracy"], "--slo 'accuracy': use DIMENSION:TIER, e.g. accuracy:good"),
    (["accuracy:"], "--slo 'accuracy:': use DIMENSION:TIER"),
    (["speed:good"], "--slo 'speed:good': the dimension must be one of accuracy, latency"),
    (["accuracy:great"], "--slo 'accuracy:great': the tier must be one of best, good, fair, basic"),
    (["accuracy:good", "accuracy:best"], "--slo accuracy given more than once"),
])
def test_bad_slos_are_explained(items: list[str], message: str) -> None:
    with pytest.raises(InputError) as caught:
        wf.parse_slo(items)
    assert str(caught.value).startswith(message)


# --- rendering ------------------------------------------------------------------------------------------

T0 = 1_700_000_000.0


def invocation(stage: str, **kw: Any) -> InvocationView:
    base = dict(invocation_id=f"{stage}-1", stage=stage, item=None, attempt=1, executor="minilm-cpu",
                knobs={}, node="cpu-node", component_id="c1", device_indexes=(0,), state="succeeded", error="",
                started_at_unix_s=T0 + 1.0, ended_at_unix_s=T0 + 1.5, latency_s=0.5, energy_j=2.25,
                simulated=False)
    base.update(kw)
    return InvocationView(**base)


def sample_job(**kw: Any) -> JobView:
    base = dict(
        job_id="job-42", workflow="rag-qa", workflow_version=3, state="succeeded", reason="",
        slo={"accuracy": "good", "latency": "best"}, submitted_at_unix_s=T0, started_at_unix_s=T0 + 0.25,
        ended_at_unix_s=T0 + 4.25,
        outputs={"answer": "Paris is the [bold]capital[/bold].",
                 "passages": [{"id": "d3", "score": 0.91234}, {"id": "d1", "score": 0.5}],
                 "frame": {"name": "f0.jpg", "media_type": "image/jpeg", "data": b"\xff" * 1234},
                 "raw": b"\0\1\2",
                 "embedding": [0.5] * 384,
                 "candidates": ["print(1)", "print(2)"],
                 "meta": {"ok": True, "n": 2}},
        invocations=(
            invocation("embed_passages", item=0, knobs={"top_k": 5, "mode": "fast"}),
            invocation("embed_passages", item=1, attempt=1, state="failed", error="engine_failed: connection reset",
                       node="sim-node-1", device_indexes=(2, 3), energy_j=None, latency_s=None),
            invocation("embed_passages", item=1, attempt=2, started_at_unix_s=T0 + 2.0, ended_at_unix_s=T0 + 3.0),
            invocation("answer", executor="sim-chat", simulated=True, energy_j=100.0, node="sim-node-2",
                       started_at_unix_s=T0 + 3.0, ended_at_unix_s=T0 + 4.0, latency_s=1.0),
        ))
    base.update(kw)
    return JobView(**base)


def render(renderables: Any) -> str:
    console = Console(file=io.StringIO(), width=220, soft_wrap=False)
    wf.show(console, renderables if isinstance(renderables, list) else [renderables])
    return console.file.getvalue()  # type: ignore[attr-defined]


def row_of(text: str, *needles: str) -> str:
    rows = [line for line in text.splitlines() if all(n in line for n in needles)]
    assert len(rows) == 1, (needles, text)
    return rows[0]


def test_job_detail_shows_header_per_invocation_rows_and_outputs() -> None:
    text = render(wf.job_detail(sample_job(), now_unix_s=T0 + 10))
    assert "job job-42  succeeded" in text
    assert "workflow rag-qa@3   slo accuracy:good, latency:best" in text
    assert "queued 0.25 s   ran 4.00 s" in text
    assert "4 invocations, energy 104.50 J (1 simulated)" in text
    first = row_of(text, "embed_passages", "top_k")
    assert "mode=\"fast\", top_k=5" in first and "cpu-node" in first and "0.75" in first and "1.25" in first
    failed = row_of(text, "failed")
    assert "sim-node-1" in failed and "2,3" in failed and "engine_failed: connection reset" in failed
    retry = row_of(text, "embed_passages", "│    1 │   2 │")
    assert "1.75" in retry and "2.75" in retry
    answer = row_of(text, "sim-chat")
    assert "succeeded (simulated)" in answer and "100.0" in answer and "1.000" in answer
    # outputs: text as is (no markup interpretation), records as a table, blobs and vectors summarised
    assert "Paris is the [bold]capital[/bold]." in text
    assert "d3" in row_of(text, "0.9123")
    assert "<1234 bytes image/jpeg> f0.jpg" in text
    assert "<3 bytes application/octet-stream>" in text
    assert "<vector of 384 numbers: [0.5, 0.5, 0.5, ..., 0.5]>" in text
    assert "[0] print(1)" in text and "[1] print(2)" in text
    assert '"ok": true' in text
    assert "\xff" not in text


def test_running_job_without_errors_has_no_error_column_and_a_running_time() -> None:
    job = sample_job(state="running", ended_at_unix_s=None, outputs={},
                     invocations=(invocation("load", ended_at_unix_s=None, latency_s=None, energy_j=None,
                                             state="running"),))
    text = render(wf.job_detail(job, now_unix_s=T0 + 5.25))
    assert "running for 5.00 s" in text and "ERROR" not in text and "outputs:" not in text
    assert "1 invocations" in text and "energy" not in text.split("STAGE")[0].split("invocations")[1]


def test_job_json_is_valid_json_with_bytes_summarised() -> None:
    data = json.loads(wf.dumps(sample_job(outputs={
        "frame": {"name": "f0.jpg", "media_type": "image/jpeg", "data": b"\xff" * 1234},
        "frames": [{"name": "a.png", "media_type": "image/png", "data": b"12"}],
        "raw": b"\0\1\2", "nested": {"deep": [b"ab"]}, "bad": float("nan"), "tuple": (1, 2)})))
    outputs = data["outputs"]
    assert outputs["frame"] == {"name": "f0.jpg", "media_type": "image/jpeg",
                                "data": {"bytes": 1234, "media_type": "image/jpeg"}}
    assert outputs["frames"][0]["data"] == {"bytes": 2, "media_type": "image/png"}
    assert outputs["raw"] == {"bytes": 3, "media_type": "application/octet-stream"}
    assert outputs["nested"] == {"deep": [{"bytes": 2, "media_type": "application/octet-stream"}]}
    assert outputs["bad"] is None and outputs["tuple"] == [1, 2]
    assert data["invocations"][1]["device_indexes"] == [2, 3] and data["slo"] == {"accuracy": "good",
                                                                                    "latency": "best"}


def test_list_tables_render_rows() -> None:
    jobs = [JobSummary("job-1", "rag-qa", "failed", "stage answer: " + "x" * 100, {"latency": "best"}, T0,
                       T0 + 3, 3.0, 12.5)]
    text = render(wf.jobs_table(jobs, now_unix_s=T0 + 300))
    row = row_of(text, "job-1")
    assert "failed" in row and "latency:best" in row and "5m ago" in row and "3.00" in row and "12.5" in row
    assert "x" * 38 not in row and "..." in row
    executors = [ExecutorView("minilm", "embed", "vllm", "cpu", 2, {"frames": (4, 8), "mode": ("a",)},
                              {"knobs": {"frames": {"values": [4, 8], "default": 8}}})]
    assert "frames=4|8*; mode=a" in render(wf.executors_table(executors))
    components = [
        ComponentView("sim-node-1", True, ComponentReport("c-1", "chat", "failed", (0, 1), 2, 3, "exit 1", True),
                      "c-1", "chat", (0, 1), "start timed out"),
        ComponentView("cpu-node", False, None, "c-2", "embed", ()),
    ]
    text = render(wf.components_table(components))
    row = row_of(text, "c-1")
    assert "yes" in row and "failed (simulated)" in row and "0,1" in row and "exit 1 / start timed out" in row
    assert "not reported" in row_of(text, "c-2") and "no" in row_of(text, "c-2")
    assert json.loads(wf.dumps(components))[0]["report"]["state"] == "failed"


# --- waiting ------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_wait_long_polls_until_terminal_or_timeout() -> None:
    clock = FakeClock()
    asked: list[tuple[float, float]] = []

    def call(msg: GetJob, timeout_s: float) -> JobDetail:
        asked.append((msg.wait_s, timeout_s))
        clock.now += msg.wait_s  # the controller holds the request for wait_s
        state = "succeeded" if len(asked) == 3 else "running"
        return JobDetail(sample_job(state=state))

    job, timed_out = wf.wait_for_job(call, "job-42", 25.0, 5.0, clock, clock.sleep)
    assert job.state == "succeeded" and not timed_out
    assert asked == [(10.0, 15.0), (10.0, 15.0), (5.0, 10.0)]

    clock.now, asked[:] = 0.0, []
    job, timed_out = wf.wait_for_job(lambda m, t: JobDetail(sample_job(state="running")), "job-42", 3.0, 5.0,
                                     clock, clock.sleep)
    assert timed_out and job.state == "running" and clock.now >= 3.0


def test_wait_does_not_spin_on_a_controller_that_answers_at_once() -> None:
    clock = FakeClock()
    calls = []

    def call(msg: GetJob, timeout_s: float) -> JobDetail:
        calls.append(msg)
        return JobDetail(sample_job(state="running"))

    _, timed_out = wf.wait_for_job(call, "j", 5.0, 1.0, clock, clock.sleep)
    assert timed_out and 10 <= len(calls) <= 12  # one poll per 0.5 s of sleep


# --- commands against a fake admin endpoint ---------------------------------------------------------------


class FakeController:
    """A loopback ROUTER that answers admin requests from a handler and records them."""

    def __init__(self, handler: Callable[[Any], Any]) -> None:
        self.handler = handler
        self.requests: list[Any] = []
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            peer, data = self.sock.recv_multipart()
            frame = decode(data)
            self.requests.append(frame.message)
            self.sock.send_multipart([peer, encode(self.handler(frame.message), frame.request_id)])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(linger=0)
        self.ctx.destroy(linger=0)


@pytest.fixture
def controller() -> Iterator[Callable[[Callable[[Any], Any]], FakeController]]:
    started: list[FakeController] = []

    def start(handler: Callable[[Any], Any]) -> FakeController:
        started.append(FakeController(handler))
        return started[-1]

    yield start
    for fake in started:
        fake.close()


RAG = WorkflowDetail(WorkflowSummary("rag-qa", 3, "questions over a corpus", 5,
                                     {"question": "text", "corpus": "file"}, T0), "kind: Workflow\n", {})


def rag_handler(final_state: str = "succeeded", reason: str = "") -> Callable[[Any], Any]:
    def handle(msg: Any) -> Any:
        if isinstance(msg, GetWorkflow):
            return RAG if msg.name == "rag-qa" else ErrorReply("unknown_workflow", f"no workflow named {msg.name!r}")
        if isinstance(msg, SubmitJob):
            return JobAccepted("job-42", 3)
        if isinstance(msg, GetJob):
            return JobDetail(sample_job(state=final_state, reason=reason))
        if isinstance(msg, ListJobs):
            return JobList((JobSummary("job-42", "rag-qa", "running", "", {}, T0, None, None, None),))
        if isinstance(msg, CancelJob):
            return JobDetail(sample_job(state="cancelled", reason=msg.reason))
        if isinstance(msg, ListExecutors):
            return ExecutorList(())
        if isinstance(msg, ListComponents):
            return ComponentList(())
        return ErrorReply("unsupported", type(msg).__name__)
    return handle


def test_run_sends_converted_inputs_and_prints_the_job_id(controller: Any, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"id": "a", "text": "x"}\n')
    fake = controller(rag_handler())
    assert main(["--controller", fake.address, "run", "rag-qa", "--input", "question=why?", "-i",
                 f"corpus=@{corpus}", "--slo", "accuracy:good", "--idempotency-key", "k1"]) == 0
    assert capsys.readouterr().out == "job-42\n"
    submit = fake.requests[-1]
    assert isinstance(submit, SubmitJob) and submit.slo == {"accuracy": "good"} and submit.idempotency_key == "k1"
    assert submit.inputs == {"question": "why?", "corpus": {"name": "corpus.jsonl", "media_type":
                                                           "application/octet-stream",
                                                           "data": b'{"id": "a", "text": "x"}\n'}}
    assert main(["--controller", fake.address, "run", "rag-qa", "-i", "question=q", "-i", f"corpus=@{corpus}",
                 "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"job_id": "job-42", "workflow_version": 3}


def test_run_refuses_bad_inputs_before_submitting(controller: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake = controller(rag_handler())
    assert main(["--controller", fake.address, "run", "rag-qa", "-i", "question=q"]) == 1
    assert capsys.readouterr().err == ("murakkabctl: missing required input corpus (file); pass --input "
                                       "corpus=VALUE or --input corpus=@FILE\n")
    assert main(["--controller", fake.address, "run", "rag-qa", "-i", "q=1", "--slo", "speed:best"]) == 1
    assert "dimension must be one of accuracy, latency" in capsys.readouterr().err
    assert main(["--controller", fake.address, "run", "nope", "-i", "q=1"]) == 1
    assert capsys.readouterr().err == "murakkabctl: unknown_workflow: no workflow named 'nope'\n"
    assert not any(isinstance(m, SubmitJob) for m in fake.requests)


@pytest.mark.parametrize("state, reason, code, err", [
    ("succeeded", "", 0, ""),
    ("failed", "stage answer: engine_failed", 1, "murakkabctl: job job-42 failed: stage answer: engine_failed\n"),
    ("cancelled", "by operator", 1, "murakkabctl: job job-42 cancelled: by operator\n"),
])
def test_run_wait_prints_the_job_and_exits_by_its_state(controller: Any, tmp_path: Path, state: str, reason: str,
                                                         code: int, err: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.jsonl").write_text("{}\n")
    fake = controller(rag_handler(state, reason))
    argv = ["--controller", fake.address, "run", "rag-qa", "-i", "question=q", "-i", f"corpus=@{tmp_path}/c.jsonl",
            "--wait", "-o", "json"]
    assert main(argv) == code
    out, got_err = capsys.readouterr()
    assert json.loads(out)["state"] == state and got_err == err


def test_run_wait_timeout_exits_2_and_names_the_job(controller: Any, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.jsonl").write_text("{}\n")
    fake = controller(rag_handler("running"))
    assert main(["--controller", fake.address, "run", "rag-qa", "-i", "question=q", "-i",
                 f"corpus=@{tmp_path}/c.jsonl", "--wait", "--timeout-s", "0.3"]) == 2
    out, err = capsys.readouterr()
    assert "job job-42  running" in out
    assert err == ("murakkabctl: job job-42 is still running after 0.3s; follow it with "
                   "'murakkabctl job show job-42'\n")


def test_jobs_show_cancel_and_lists(controller: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake = controller(rag_handler())
    base = ["--controller", fake.address]
    assert main([*base, "jobs", "--state", "running", "--workflow", "rag-qa", "--limit", "5"]) == 0
    assert "job-42" in capsys.readouterr().out
    assert fake.requests[-1] == ListJobs(limit=5, state="running", workflow="rag-qa")
    assert main([*base, "job", "show", "job-42"]) == 0
    assert "sim-chat" in capsys.readouterr().out
    assert main([*base, "job", "cancel", "job-42", "--reason", "wrong corpus"]) == 0
    assert capsys.readouterr().out.strip() == "job job-42: cancelled (wrong corpus)"
    assert main([*base, "catalog", "list", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main([*base, "components"]) == 0
    assert "no components" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*base, "jobs", "--state", "done"])


DOCUMENT = {"apiVersion": "murakkab.dev/v1", "kind": "Workflow", "metadata": {"name": "rag-qa"}, "spec": {
    "inputs": {"question": {"type": "text"}, "corpus": {"type": "file"}},
    "stages": [{"name": "load", "task": "load-documents", "inputs": {"corpus": "inputs.corpus"}},
               {"name": "embed_passages", "task": "embed", "inputs": {"text": "load.texts"}, "map": "text",
                "constraints": {"executor": "minilm-embed-cpu"}}],
    "outputs": {"texts": "load.texts"}}}


def test_workflow_show_as_table_yaml_and_json(controller: Any, capsys: pytest.CaptureFixture[str]) -> None:
    detail = WorkflowDetail(WorkflowSummary("rag-qa", 2, "questions [b]over[/b] a corpus", 2,
                                            {"question": "text", "corpus": "file"}, T0), "kind: Workflow\n", DOCUMENT)
    fake = controller(lambda msg: detail)
    base = ["--controller", fake.address, "workflow", "show", "rag-qa"]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "workflow rag-qa@2   2 stages" in out and "questions [b]over[/b] a corpus" in out
    assert "inputs: question (text), corpus (file)" in out and "outputs: texts=load.texts" in out
    row = row_of(out, "embed_passages")
    assert "embed" in row and "text" in row and "text=load.texts" in row and "executor=minilm-embed-cpu" in row
    assert main([*base, "-o", "yaml"]) == 0
    assert capsys.readouterr().out == "kind: Workflow\n"
    assert main([*base, "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["spec"] == DOCUMENT


def test_apply_validates_locally_and_sends_nothing_for_a_broken_file(controller: Any, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("common.workflow.loader")
    fake = controller(lambda msg: ErrorReply("unexpected", "nothing should be sent"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: murakkab.dev/v1\nkind: Workflow\nmetadata:\n  name: w\nspec:\n  stages: 3\n")
    for kind in ("workflow", "catalog"):
        assert main(["--controller", fake.address, kind, "apply", str(broken)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"murakkabctl: {broken} is not a valid {kind}:\n{broken}:"), err
    assert main(["--controller", fake.address, "workflow", "apply", str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("murakkabctl: cannot read ") and "No such file or directory" in err, err
    assert fake.requests == []


def test_apply_sends_the_file_text_under_its_basename_and_prints_warnings(
        controller: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    loaded: list[str] = []
    loader = types.ModuleType("common.workflow.loader")
    loader.SpecError = ValueError  # type: ignore[attr-defined]
    loader.load_catalog_file = loader.load_workflow_file = loaded.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "common.workflow.loader", loader)

    def handle(msg: Any) -> Any:
        if isinstance(msg, ApplyCatalog):
            return CatalogApplied(4, ("minilm", "sim-chat"), ("sim-chat: no quality entries",))
        return WorkflowApplied("rag-qa", 2, True)

    fake = controller(handle)
    path = tmp_path / "cpu.yaml"
    path.write_text("kind: ExecutorCatalog\n")
    assert main(["--controller", fake.address, "catalog", "apply", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == "catalog version 4: 2 executors applied (minilm, sim-chat)\n"
    assert err == "murakkabctl: warning: sim-chat: no quality entries\n"
    assert fake.requests[-1] == ApplyCatalog("cpu.yaml", "kind: ExecutorCatalog\n") and loaded == [str(path)]
    assert main(["--controller", fake.address, "workflow", "apply", str(path), "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"name": "rag-qa", "version": 2, "unchanged": True, "warnings": []}
    assert fake.requests[-1] == ApplyWorkflow("cpu.yaml", "kind: ExecutorCatalog\n")
