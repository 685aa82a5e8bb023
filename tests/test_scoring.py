"""Answer parsing: strict is anchored at the start of the completion, lenient finds the first
whole answer anywhere, and neither ever matches by substring."""
import pytest

from iclvsft.scoring import FORMATS, score
from iclvsft.tasks import Item

INT = FORMATS["int"]


@pytest.mark.parametrize("completion, strict, lenient", [
    ("10", "10", "10"),            # gold "1" must not match "10"
    (" 7\n", "7", "7"),
    ("7.", "7", "7"),
    ("7.\n(1+2)=3", "7", "7"),
    ("The answer is 7", None, "7"),
    ("", None, None),
    ("   \n", None, None),
    ("-3", "-3", "-3"),
    (" -3\n", "-3", "-3"),
    ("-03", "-3", "-3"),
    ("7.5", None, None),           # not an integer, and lenient never takes the "7" of "7.5"
    ("x7 y", None, None),
    ("7 8", None, None),           # two answers: a hedge, not an answer
    ("3 or 4", None, None),
    ("3,000", None, None),         # not 3
    ("7 or 7", None, "7"),         # the same answer twice is one answer
    ("so 7\n8", None, "7"),        # the first line holding an answer decides
    ("1" * 5000, None, None),      # int() refuses 4,300+ digits: invalid, never a crash
    ("\n\n12\n", "12", "12"),      # leading whitespace, newlines included, is skipped
    ("=12", None, "12"),
])
def test_int_parsing(completion, strict, lenient):
    assert INT.strict(completion) == strict
    assert INT.lenient(completion) == lenient


@pytest.mark.parametrize("fmt, completion, strict, lenient", [
    ("bool", "True False", None, None),
    ("bool", "not True", None, None),
    ("bool", "True, not False", None, None),
    ("yesno", "Yes, no", None, None),
    ("pair", "a = 1, b = 2 or a = 3, b = 4", None, None),
    ("bool", " true\n", "True", "True"),
    ("bool", "FALSE.", "False", "False"),
    ("bool", "Trueish", None, None),
    ("bool", "It is False", None, "False"),
    ("yesno", " Yes\nNo", "Yes", "Yes"),
    ("yesno", "Noah", None, None),
    ("parity", " Odd", "odd", "odd"),
    ("parity", "evens", None, None),
    ("pair", " a = 3, b = 2\n", "a = 3, b = 2", "a = 3, b = 2"),
    ("pair", "a=3,b=2", "a = 3, b = 2", "a = 3, b = 2"),
    ("pair", "a = 3", None, None),
    ("pair", "so a = 13, b = 2", None, "a = 13, b = 2"),
])
def test_label_and_pair_parsing(fmt, completion, strict, lenient):
    assert FORMATS[fmt].strict(completion) == strict
    assert FORMATS[fmt].lenient(completion) == lenient


def _item(answer, shortcut, split="control"):
    return Item(id="x", task="expression", split=split, question="q=", answer=answer, shortcut_answer=shortcut)


def test_score_fields():
    s = score(_item("1", "3"), "10", "int")
    assert (s.strict, s.correct, s.invalid, s.shortcut) == ("10", False, False, False)
    s = score(_item("1", "3"), " 3\n", "int")
    assert s.shortcut and not s.correct
    s = score(_item("1", "3"), "The answer is 1", "int")
    assert s.invalid and not s.correct and s.lenient_correct and not s.shortcut
    s = score(_item("a = 1, b = 2", None), "a = 1, b = 2", "pair")
    assert s.correct and not s.shortcut


def test_malformed_gold_answer_is_an_error():
    with pytest.raises(ValueError):
        score(_item("seven", "3"), "7", "int")
