"""lm-eval style metrics: acc vs acc_norm, number extraction, normalised exact match."""

import numpy as np
import pytest

from duet_jax.feedback import (
    choice_byte_lengths,
    exact_match,
    extract_number,
    mc_accuracy,
    normalize_answer,
)


def test_acc_and_acc_norm_differ_as_lm_eval_defines():
    choices = ["cat", "a very long answer indeed"]
    ll = np.array([[-6.0, -10.0]])  # short choice wins on total, long one per byte
    lens = choice_byte_lengths(choices)[None]
    assert lens.tolist() == [[4.0, 26.0]]
    m = mc_accuracy(ll, np.array([1]), lens)
    assert m["acc"].tolist() == [0.0] and m["acc_norm"].tolist() == [1.0]


def test_padding_choices_never_win():
    ll = np.array([[-5.0, -1.0, 0.0]])
    m = mc_accuracy(ll, np.array([1]), np.ones((1, 3)), valid=np.array([[True, True, False]]))
    assert m["acc"].tolist() == [1.0]


@pytest.mark.parametrize("text,num", [
    ("She makes 9 * 2 = $18 every day. The answer is 18.", "18"),
    ("blah #### 1,234", "1234"),
    ("so 3.50 dollars, then 7.0", "7"),
    ("The answer is -4.", "-4"),
    ("no digits here", None),
])
def test_extract_number(text, num):
    assert extract_number(text) == num


def test_exact_match():
    assert normalize_answer("The  Sunset Boulevard!") == "sunset boulevard"
    assert exact_match(" Sunset Blvd.\nmore text", ["Sunset Boulevard", "sunset blvd"]) == 1.0
    assert exact_match("Paris", ["London"]) == 0.0
    assert exact_match("... so the answer is 18.", ["Janet ... #### 18"], kind="math") == 1.0
    assert exact_match("The answer is 17.", ["#### 18"], kind="math") == 0.0
