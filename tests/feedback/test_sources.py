"""External command and callable feedback: parsing, time-out, retries, clear failures."""

import os
import sys
import time
from pathlib import Path

import pytest

from duet_jax.errors import ConfigError, FeedbackError
from duet_jax.feedback import (
    CallableFeedback,
    CommandFeedback,
    FeedbackRequest,
    check_feedback_config,
    parse_feedback,
)

REQ = FeedbackRequest(adapter_dir=Path("/tmp/adapter x"), ratio={"a": 0.25, "b": 0.75}, round=3, seed=7)
PY = sys.executable


def script(tmp_path, body):
    p = tmp_path / "eval.py"
    p.write_text(body)
    return p


def test_command_gets_placeholders_and_its_last_line_is_the_feedback(tmp_path):
    s = script(tmp_path, "import sys, json\nprint('loading', sys.argv[1])\n"
                         "r = json.loads(sys.argv[2]); print('evaluated 48/48 examples')\n"
                         "print(r['b'] + int(sys.argv[3]))\n")
    fb = CommandFeedback(f"{PY} {s} {{adapter_dir}} {{ratio_json}} {{round}}")
    assert fb.argv(REQ)[2] == "/tmp/adapter x"  # one argument, spaces kept, no shell
    assert fb(REQ) == pytest.approx(3.75)


def test_json_feedback_line():
    assert parse_feedback('noise 12\n{"feedback": 0.5, "n": 100}\n') == 0.5
    assert parse_feedback('{"feedback": 3}') == 3.0


@pytest.mark.parametrize("out, value", [
    ("0.4375", 0.4375), ("log line 99\n-2\n\n", -2.0), ("1e-3", 1e-3), ("+7.5E+01\n", 75.0),
    (".5", 0.5), ("3.", 3.0), ("  0.25  ", 0.25),
    ("feedback: 0.75", 0.75), ("FEEDBACK=0.75", 0.75), ("Feedback = 2e-1", 0.2),
    ('{"feedback": 1e-2, "examples": 48}', 0.01),
])
def test_well_defined_answers(out, value):
    assert parse_feedback(out) == pytest.approx(value)


@pytest.mark.parametrize("out", [
    "scoring adapter /runs/x/eval0000_0",  # issue 11: was scored 0.0 (and 1.0 for eval0000_1)
    "scoring adapter /runs/x/eval0000_1",
    "evaluated 48/48 examples",  # issue 11: was scored 48.0
    "0.5\nevaluated 48/48 examples",  # a number on an earlier line is not the answer
    "accuracy 0.5", "score: 0.5", "0.5 0.6", "1_000", "0x10", "12%",
    '{"accuracy": 0.5}', '{"feedback": "0.5"}', '{"feedback": true}', '{"feedback": null}',
    '{"feedback": 0.5', "[0.5]",
])
def test_anything_else_fails_with_the_output_tail(out):
    with pytest.raises(FeedbackError) as e:
        parse_feedback(out)
    assert out.strip().splitlines()[-1][-40:] in str(e.value)
    assert e.value.output_tail.endswith(out.strip()[-40:])


@pytest.mark.parametrize("out", ["", "  \n\n", "nan", "-inf", "inf", "feedback: nan", "FEEDBACK=inf",
                                 '{"feedback": NaN}', '{"feedback": Infinity}', "1e999",
                                 '{"feedback": 1%s}' % ("0" * 400)])
def test_empty_or_nonfinite_fails(out):
    with pytest.raises(FeedbackError, match="printed nothing|not a finite number"):
        parse_feedback(out)


def test_error_carries_only_the_tail_of_a_long_output():
    out = "".join(f"line {i} of the evaluator's log\n" for i in range(200)) + "done"
    with pytest.raises(FeedbackError) as e:
        parse_feedback(out)
    tail = e.value.output_tail
    assert tail.endswith("line 199 of the evaluator's log\ndone") and "line 0 " not in tail
    assert len(tail) <= 510


def test_regression_scoring_adapter_command_is_a_failure_not_a_score(tmp_path):
    s = script(tmp_path, "import sys\nprint('scoring adapter', sys.argv[1])\n")
    fb = CommandFeedback(f"{PY} {s} {{adapter_dir}}", retries=0)
    req = FeedbackRequest(adapter_dir=tmp_path / "eval0000_0", ratio={"a": 1.0}, round=0, seed=0)
    with pytest.raises(FeedbackError, match="not a feedback value.*scoring adapter") as e:
        fb(req)
    assert "eval0000_0" in e.value.output_tail


def test_failing_command_retries_then_raises(tmp_path):
    counter = tmp_path / "n"
    s = script(tmp_path, f"import pathlib, sys\np = pathlib.Path({str(counter)!r})\n"
                         "n = int(p.read_text()) if p.exists() else 0\np.write_text(str(n + 1))\n"
                         "sys.exit('boom')\n")
    fb = CommandFeedback(f"{PY} {s}", retries=2, backoff_s=0.0)
    with pytest.raises(FeedbackError, match="exit status 1.*boom"):
        fb(REQ)
    assert counter.read_text() == "3"


def test_retry_succeeds_second_time(tmp_path):
    counter = tmp_path / "n"
    s = script(tmp_path, f"import pathlib, sys\np = pathlib.Path({str(counter)!r})\n"
                         "n = int(p.read_text()) if p.exists() else 0\np.write_text(str(n + 1))\n"
                         "print(0.9) if n else sys.exit(2)\n")
    assert CommandFeedback(f"{PY} {s}", retries=1, backoff_s=0.0)(REQ) == 0.9


def test_timeout(tmp_path):
    s = script(tmp_path, "import time\nprint('started', flush=True)\ntime.sleep(30)\n")
    with pytest.raises(FeedbackError, match="timed out.*started"):
        CommandFeedback(f"{PY} {s}", timeout_s=0.5, retries=0)(REQ)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie is dead, waiting for init to reap it


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_timeout_kills_the_commands_children(tmp_path):
    pidfile = tmp_path / "child.pid"
    cmd = f"sh -c 'sleep 60 & echo $! > {pidfile}; sleep 60'"
    with pytest.raises(FeedbackError, match="timed out"):
        CommandFeedback(cmd, timeout_s=0.5, retries=0)(REQ)
    child = int(pidfile.read_text())
    for _ in range(100):  # SIGKILL is asynchronous: give the kernel a moment
        if not _alive(child):
            break
        time.sleep(0.05)
    alive = _alive(child)
    if alive:
        os.kill(child, 9)
    assert not alive, "the timed-out command's child survived it"


def test_command_failure_carries_stdout_and_stderr_tail(tmp_path):
    s = script(tmp_path, "import sys\nprint('loaded 3 shards')\nsys.stderr.write('CUDA out of memory\\n')\n"
                         "sys.exit(3)\n")
    with pytest.raises(FeedbackError, match="exit status 3.*loaded 3 shards.*CUDA out of memory") as e:
        CommandFeedback(f"{PY} {s}", retries=0)(REQ)
    assert "CUDA out of memory" in e.value.output_tail


def test_bad_commands():
    with pytest.raises(ConfigError):
        CommandFeedback("")
    with pytest.raises(ConfigError, match=r"unknown placeholder \{model\}"):
        CommandFeedback("eval {model}")
    with pytest.raises(ConfigError, match="stray brace"):
        CommandFeedback("eval {adapter_dir")
    with pytest.raises(ConfigError, match="cannot parse"):
        CommandFeedback("eval 'unclosed")
    assert CommandFeedback("eval {{literal}} {seed}").argv(REQ) == ["eval", "{literal}", "7"]
    with pytest.raises(FeedbackError, match="cannot start"):
        CommandFeedback("/nonexistent/eval-binary", retries=0)(REQ)


def test_check_feedback_config_command(tmp_path):
    assert isinstance(check_feedback_config(command=f"{PY} -c pass {{adapter_dir}}"), CommandFeedback)
    assert check_feedback_config(command="sh -c true") is not None  # found on PATH
    assert check_feedback_config() is None  # the built-in evaluator
    with pytest.raises(ConfigError, match=r"\{adapter\}"):
        check_feedback_config(command="sh eval.sh {adapter}")
    with pytest.raises(ConfigError, match="not on PATH"):
        check_feedback_config(command="no-such-evaluator-xyz {adapter_dir}")
    with pytest.raises(ConfigError, match="does not exist"):
        check_feedback_config(command=f"{tmp_path}/missing.sh {{adapter_dir}}")
    plain = tmp_path / "eval.sh"
    plain.write_text("echo 1\n")
    plain.chmod(0o644)
    if os.geteuid() != 0:  # root may execute anything
        with pytest.raises(ConfigError, match="not executable"):
            check_feedback_config(command=f"{plain} {{adapter_dir}}")
    plain.chmod(0o755)
    assert check_feedback_config(command=f"{plain} {{adapter_dir}}") is not None
    with pytest.raises(ConfigError, match="not both"):
        check_feedback_config(command="sh", callable="tests.feedback.test_sources:_score")
    with pytest.raises(ConfigError, match="timeout_s"):
        check_feedback_config(command="sh", timeout_s=0)


def _score(req):
    return req.ratio["a"] * 2


def _nan(req):
    return float("nan")


def test_callable_by_path_and_object():
    assert CallableFeedback("tests.feedback.test_sources:_score")(REQ) == 0.5
    assert CallableFeedback(_score)(REQ) == 0.5
    with pytest.raises(FeedbackError, match="non-finite"):
        CallableFeedback(_nan)(REQ)
    with pytest.raises(ConfigError, match="colon"):
        CallableFeedback("no_colon_here")
    with pytest.raises(ConfigError, match="has no attribute 'missing'"):
        CallableFeedback("tests.feedback.test_sources:missing")


NOT_CALLABLE = 3


def test_check_feedback_config_callable():
    assert isinstance(check_feedback_config(callable="tests.feedback.test_sources:_score"), CallableFeedback)
    for bad, msg in [("tests.feedback.test_sources._score", "colon"), (":_score", "colon"),
                     ("tests.feedback.test_sources:", "colon"),
                     ("no_such_pkg_xyz.mod:f", "cannot import the module 'no_such_pkg_xyz.mod'"),
                     ("tests.feedback.test_sources:nope", "no attribute 'nope'"),
                     ("tests.feedback.test_sources:NOT_CALLABLE", "is a int, not callable")]:
        with pytest.raises(ConfigError, match=msg):
            check_feedback_config(callable=bad)


def test_callable_whose_module_raises_on_import(tmp_path, monkeypatch):
    (tmp_path / "broken_eval_mod.py").write_text("raise RuntimeError('needs a GPU')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="raised RuntimeError: needs a GPU"):
        check_feedback_config(callable="broken_eval_mod:score")
