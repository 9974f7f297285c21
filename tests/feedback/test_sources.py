"""External command and callable feedback: parsing, time-out, retries, clear failures."""

import sys
from pathlib import Path

import pytest

from duet_jax.errors import ConfigError, FeedbackError
from duet_jax.feedback import CallableFeedback, CommandFeedback, FeedbackRequest, parse_feedback

REQ = FeedbackRequest(adapter_dir=Path("/tmp/adapter x"), ratio={"a": 0.25, "b": 0.75}, round=3, seed=7)
PY = sys.executable


def script(tmp_path, body):
    p = tmp_path / "eval.py"
    p.write_text(body)
    return p


def test_command_gets_placeholders_and_last_number(tmp_path):
    s = script(tmp_path, "import sys, json\nprint('loading', sys.argv[1])\n"
                         "r = json.loads(sys.argv[2]); print('score:', r['b'] + int(sys.argv[3]))\n")
    fb = CommandFeedback(f"{PY} {s} {{adapter_dir}} {{ratio_json}} {{round}}")
    assert fb.argv(REQ)[2] == "/tmp/adapter x"  # one argument, spaces kept, no shell
    assert fb(REQ) == pytest.approx(3.75)


def test_json_feedback_line():
    assert parse_feedback('noise 12\n{"feedback": 0.5, "n": 100}\n') == 0.5


@pytest.mark.parametrize("out", ["", "no number", "nan", "score: inf"])
def test_no_or_nonfinite_number_fails(out):
    with pytest.raises(FeedbackError):
        parse_feedback(out)


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
    s = script(tmp_path, "import time\ntime.sleep(30)\n")
    with pytest.raises(FeedbackError, match="timed out"):
        CommandFeedback(f"{PY} {s}", timeout_s=0.5, retries=0)(REQ)


def test_bad_commands():
    with pytest.raises(ConfigError):
        CommandFeedback("")
    with pytest.raises(ConfigError, match="placeholder"):
        CommandFeedback("eval {model}").argv(REQ)
    with pytest.raises(FeedbackError, match="cannot start"):
        CommandFeedback("/nonexistent/eval-binary", retries=0)(REQ)


def _score(req):
    return req.ratio["a"] * 2


def _nan(req):
    return float("nan")


def test_callable_by_path_and_object():
    assert CallableFeedback("tests.feedback.test_sources:_score")(REQ) == 0.5
    assert CallableFeedback(_score)(REQ) == 0.5
    with pytest.raises(FeedbackError, match="non-finite"):
        CallableFeedback(_nan)(REQ)
    with pytest.raises(ConfigError):
        CallableFeedback("no_colon_here")
    with pytest.raises(ConfigError, match="cannot import"):
        CallableFeedback("tests.feedback.test_sources:missing")
