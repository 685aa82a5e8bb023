"""Task 3, boolean (absorbing term).

Three parenthesised groups of 2-3 True/False literals, joined by and/or, wrapped in one more pair of
parentheses and followed by a final clause::

    ((True and False) or (False or True) and (True or True)) and False =

* pattern: the final clause is ``and False`` or ``or True``; it absorbs everything before it, so the
  answer is that constant (the shortcut: read the last word).
* control: the final clause is ``and True`` / ``or False``, and the groups are drawn so the value
  differs from that constant: the shortcut answer (the last word) is wrong.

The outer parentheses matter: with Python's precedence (``and`` before ``or``) a bare
``x or y and False`` is ``x or (y and False)``, which ``and False`` does not absorb. Values are
computed by the small parser below, never by ``eval``.

The authors' distribution (``data.distribution: authors``, docs/authors-data.md): ``generate_authors``.
Their rows have no final clause at all, so no shortcut exists there: ``shortcut_answer`` is None.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import DataError
from .base import Draw, Item, Task, TaskConfig
from .formats import AuthorsFormat

_TOKEN = re.compile(r"\s*(\(|\)|True|False|and|or)")


def evaluate(text: str) -> bool:
    """Evaluate a True/False/and/or/parentheses expression (``and`` binds tighter than ``or``)."""
    text = text.strip().removesuffix("=").strip()
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"unexpected text at {pos}: {text[pos:pos + 10]!r}")
        tokens.append(m.group(1))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    value, end = _or_expr(tokens, 0)
    if end != len(tokens):
        raise ValueError(f"trailing tokens: {tokens[end:]}")
    return value


def _or_expr(tokens: list[str], i: int) -> tuple[bool, int]:
    value, i = _and_expr(tokens, i)
    while i < len(tokens) and tokens[i] == "or":
        rhs, i = _and_expr(tokens, i + 1)
        value = value or rhs
    return value, i


def _and_expr(tokens: list[str], i: int) -> tuple[bool, int]:
    value, i = _atom(tokens, i)
    while i < len(tokens) and tokens[i] == "and":
        rhs, i = _atom(tokens, i + 1)
        value = value and rhs
    return value, i


def _atom(tokens: list[str], i: int) -> tuple[bool, int]:
    if i >= len(tokens):
        raise ValueError("unexpected end of expression")
    tok = tokens[i]
    if tok in ("True", "False"):
        return tok == "True", i + 1
    if tok == "(":
        value, i = _or_expr(tokens, i + 1)
        if i >= len(tokens) or tokens[i] != ")":
            raise ValueError("missing ')'")
        return value, i + 1
    raise ValueError(f"unexpected token {tok!r}")


@dataclass
class BooleanConfig(TaskConfig):
    groups: int = 3
    group_size: tuple[int, int] = (2, 3)  # literals per group
    max_redraws: int = 1000  # control: redraws of the groups until their value differs from the constant

    def validate(self) -> None:
        self._check(isinstance(self.groups, int) and 1 <= self.groups <= 8, f"groups must be in 1..8, got {self.groups!r}")
        self._check_range("group_size", lo_min=1, hi_max=8)
        self._check(isinstance(self.max_redraws, int) and self.max_redraws >= 1, "max_redraws must be a positive integer")


# The final clause -> the constant it names (the shortcut answer). Pattern clauses absorb.
PATTERN_CLAUSES = ("and False", "or True")
CONTROL_CLAUSES = ("and True", "or False")


class BooleanTask(Task):
    name = "boolean"
    config_cls = BooleanConfig
    header = "Evaluate each Boolean expression."
    answer_format = "bool"
    corruptions = ("answer",)
    authors_format = AuthorsFormat(
        header="Here are some boolean expressions, you need to directly tell me the result. If it is true, print True, "
               "else print False. Here are some examples: ",
        multiline=True, answer_format="bit", max_new_tokens=1, answer_factor="labels", query_space=True)
    authors_distribution = True
    AUTHORS_GROUPS, AUTHORS_MAX_SIZE = 3, 4  # their generate_bool_expression(randoms=True)

    def authors_item(self, item: Item, ours: frozenset[str] = frozenset()) -> Item:
        """question: the expression, a newline, `` The result is:``; labels: 1 or 0 (though their header
        asks for True/False). Their training text: ``<expression>\n The result is: 1``.

        Their query ends with a space (the view adds it), as algebra's ends with ``b = ``: their budget is
        one new token, and Qwen's tokenizer writes `` 1`` as two tokens (the space, then the digit), so a
        query without the space cannot be answered within their budget."""
        question = item.question if "question" in ours else item.question.removesuffix(" =") + "\n The result is:"
        if "labels" in ours:
            return dataclasses.replace(item, question=question)
        bit = {"True": "1", "False": "0"}
        shortcut = bit[item.shortcut_answer] if item.shortcut_answer is not None else None
        return dataclasses.replace(item, question=question, answer=bit[item.answer], shortcut_answer=shortcut)

    def _groups(self, rng) -> str:
        c = self.config
        parts = []
        for g in range(c.groups):
            n = rng.randint(*c.group_size)
            literals = [rng.choice(("True", "False")) for _ in range(n)]
            ops = [rng.choice(("and", "or")) for _ in range(n - 1)]
            group = literals[0] + "".join(f" {op} {lit}" for op, lit in zip(ops, literals[1:]))
            parts.append(f"({group})")
            if g < c.groups - 1:
                parts.append(rng.choice(("and", "or")))
        return "(" + " ".join(parts) + ")"

    def generate(self, rng, split: str) -> Draw:
        clause = rng.choice(PATTERN_CLAUSES if split == "pattern" else CONTROL_CLAUSES)
        constant = clause.split()[1]
        for redraw in range(self.config.max_redraws):  # noqa: B007 (the count is recorded below)
            inner = self._groups(rng)
            # On control the value before the clause must differ from the clause's constant.
            if split == "pattern" or str(evaluate(inner)) != constant:
                break
        else:
            raise RuntimeError("boolean control: no group draw differs from the final constant")
        question = f"{inner} {clause} ="
        answer = str(evaluate(question))
        return Draw(question=question, answer=answer, shortcut_answer=constant,
                    meta={"clause": clause, "inner_value": evaluate(inner), "redraws": redraw})

    def generate_authors(self, rng, pool: str, split: str) -> Draw:
        """Their ``generate_bool_expression(randoms=True)`` (training and evaluation alike): three groups of
        random True/False joined by random and/or, each group of 2..m literals where m starts at 4 and
        becomes each group's drawn size (so later groups are never longer), the groups joined by random
        and/or, no outer parentheses and **no final clause**: nothing absorbs, no shortcut exists
        (``shortcut_answer`` None). Their "need_false" (control) wraps the expression in parentheses and
        appends ``or False`` or ``and True``, which never changes its value; ``shortcut_answer`` is then
        the clause's constant (what the last-word shortcut of our data would answer), right whenever the
        value happens to equal it."""
        parts, size = [], self.AUTHORS_MAX_SIZE
        for g in range(self.AUTHORS_GROUPS):
            size = rng.randint(2, size)
            words = [rng.choice(("True", "False"))]
            for _ in range(size - 1):
                words += [rng.choice(("and", "or")), rng.choice(("True", "False"))]
            if g:
                parts.append(rng.choice(("and", "or")))
            parts.append("(" + " ".join(words) + ")")
        text, shortcut, clause = " ".join(parts), None, None
        if split == "control":
            clause = rng.choice(CONTROL_CLAUSES)
            text, shortcut = f"({text}) {clause}", clause.split()[1]
        question = f"{text} ="
        return Draw(question=question, answer=str(evaluate(question)), shortcut_answer=shortcut,
                    meta={"clause": clause})

    def corrupt(self, item: Item, kind: str, rng) -> Iterator[tuple[str, str, str]]:
        """answer: the final clause's constant, its operator, or both flipped (in that order; no draws)."""
        self.check_corruption(kind)
        clause = item.meta["clause"]
        suffix = f" {clause} ="
        if not item.question.endswith(suffix):
            raise DataError(f"{item.id}: the question does not end with its clause {clause!r}")
        inner = item.question[: -len(suffix)]
        op, const = clause.split()
        flip_c = {"True": "False", "False": "True"}[const]
        flip_op = {"and": "or", "or": "and"}[op]
        for new_clause in (f"{op} {flip_c}", f"{flip_op} {const}", f"{flip_op} {flip_c}"):
            question = f"{inner} {new_clause} ="
            yield question, str(evaluate(question)), f"clause {clause!r} -> {new_clause!r}"
