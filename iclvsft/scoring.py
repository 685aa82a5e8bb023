"""Answer parsing and scoring: strict, lenient and invalid, never by substring.

Each task names an answer *format*. For a completion (the text the model generated after the prompt):

* **strict**: leading whitespace is dropped and only the first line is read. That line, with
  surrounding whitespace and at most one trailing ``.`` removed, must be exactly one well-formed
  answer. So ``" 7\\n..."`` -> ``7``, ``"7."`` -> ``7``, ``"10"`` -> ``10`` (wrong for gold ``1``),
  ``"The answer is 7"`` -> invalid, ``"True False"`` -> invalid, ``""`` -> invalid.
* **lenient**: the well-formed answer on the first line of the completion that holds one, as a whole
  token (``"10"`` never yields ``1``; ``"7.5"``, ``"x7"`` and ``"3,000"`` yield nothing).
  ``"The answer is 7"`` -> ``7``. A hedge is not an answer: a line with two different answers
  (``"3 or 4"``, ``"True False"``, ``"Yes, no"``) or a negated label (``"not True"``) yields nothing.
* **invalid**: no strict parse. Counted, reported, never a crash (a 5,000-digit "answer" included).
* **substring** (:func:`substring_match`): the authors' scorer, kept only to reproduce their numbers
  (the ladder's first rungs): the gold string anywhere in the completion, so gold ``1`` matches ``10``.

Answers are normalised before comparison: integers via ``int`` (``"-03"`` -> ``"-3"``), labels
case-insensitively to their canonical spelling (``true`` -> ``True``), pairs to ``a = x, b = y``.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .tasks import Item


@dataclass(frozen=True)
class AnswerFormat:
    """How answers of one kind are written, found and normalised."""

    name: str
    pattern: str  # regex for one answer, without anchors or boundaries
    normalise: Callable[[re.Match], str]
    labels: tuple[str, ...] = ()  # the closed label set of binary tasks (constrained scoring)
    flags: int = 0

    def __post_init__(self):
        # A whole-token match: not glued to a word character, or to a decimal point or thousands
        # comma followed by a digit ("7.5", "3,000" hold no integer answer).
        object.__setattr__(self, "_full", re.compile(rf"(?:{self.pattern})", self.flags))
        object.__setattr__(self, "_search", re.compile(rf"(?<![\w.])(?<!\d,)(?:{self.pattern})(?![\w]|[.,]\d)",
                                                       self.flags))
        negated = rf"\bnot\s+(?:{'|'.join(self.labels)})\b" if self.labels else r"(?!)"
        object.__setattr__(self, "_negated", re.compile(negated, re.IGNORECASE))

    def _value(self, m: re.Match) -> str | None:
        try:
            return self.normalise(m)
        except ValueError:  # int() refuses more than 4,300 digits: not an answer, never a crash
            return None

    def strict(self, completion: str) -> str | None:
        line = completion.lstrip().split("\n", 1)[0].strip()
        if line.endswith("."):
            line = line[:-1].rstrip()
        m = self._full.fullmatch(line)
        return self._value(m) if m else None

    def lenient(self, completion: str) -> str | None:
        for line in completion.split("\n"):
            found = {self._value(m) for m in self._search.finditer(line)}
            if found:
                hedged = len(found) > 1 or None in found or self._negated.search(line)
                return None if hedged else found.pop()
        return None

    def canonical(self, answer: str) -> str:
        """The normalised form of a gold answer (raises if the gold answer is malformed)."""
        value = self.strict(answer)
        if value is None:
            raise ValueError(f"{answer!r} is not a well-formed {self.name} answer")
        return value


def _label_format(name: str, labels: tuple[str, ...]) -> AnswerFormat:
    lookup = {label.lower(): label for label in labels}
    return AnswerFormat(name, "|".join(labels), lambda m: lookup[m.group(0).lower()], labels=labels, flags=re.IGNORECASE)


FORMATS: dict[str, AnswerFormat] = {
    "int": AnswerFormat("int", r"-?\d+", lambda m: str(int(m.group(0)))),
    "bool": _label_format("bool", ("True", "False")),
    "yesno": _label_format("yesno", ("Yes", "No")),
    "parity": _label_format("parity", ("even", "odd")),
    "bit": _label_format("bit", ("1", "0")),  # the authors' boolean answers
    "pair": AnswerFormat(
        "pair", r"a\s*=\s*(-?\d+)\s*,\s*b\s*=\s*(-?\d+)",
        lambda m: f"a = {int(m.group(1))}, b = {int(m.group(2))}", flags=re.IGNORECASE,
    ),
}


@dataclass(frozen=True)
class Score:
    """The verdict on one completion for one item."""

    strict: str | None  # parsed answer, None when invalid
    lenient: str | None
    correct: bool  # strict parse equals the gold answer
    lenient_correct: bool
    invalid: bool  # no strict parse
    shortcut: bool  # strict parse equals the shortcut answer (the shortcut rate's numerator)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def substring_match(answer: str | None, completion: str, aliases: tuple[str, ...] = ()) -> bool | None:
    """The authors' scoring: ``answer`` (or one of ``aliases``) occurs anywhere in ``completion``;
    None when there is no answer to look for."""
    if answer is None:
        return None
    return any(text in completion for text in (answer, *aliases))


def score(item: Item, completion: str, answer_format: str | AnswerFormat) -> Score:
    fmt = FORMATS[answer_format] if isinstance(answer_format, str) else answer_format
    gold = fmt.canonical(item.answer)
    shortcut = fmt.canonical(item.shortcut_answer) if item.shortcut_answer is not None else None
    strict, lenient = fmt.strict(completion), fmt.lenient(completion)
    return Score(strict=strict, lenient=lenient, correct=strict == gold, lenient_correct=lenient == gold,
                 invalid=strict is None, shortcut=strict is not None and strict == shortcut)
