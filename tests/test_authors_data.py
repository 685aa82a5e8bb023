"""``data.distribution: authors``: a few thousand rows per task checked against the statistics measured
from the authors' release (docs/authors-data.md), every answer re-derived from the question text by a
second route (a regex-and-sum reading of expressions, union-find for relation, Python's ``ast`` walked
by hand for boolean, Cramer's rule for algebra), and the default data left as it was."""
from __future__ import annotations

import ast
import re
from fractions import Fraction

import pytest
from conftest import ast_bool

from iclvsft.config import DEFAULTS, check_section, load_config
from iclvsft.data import data_config, generate_task
from iclvsft.errors import ConfigError
from iclvsft.prompts import build_prompt
from iclvsft.tasks import get_task, task_in_format

N_TRAIN, N_TEST = 3000, 2000


def items(task: str, pool: str, split: str, n: int):
    t = get_task(task)
    return [t.make_item(7, pool, split, i, "authors") for i in range(n)]


def share(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags)


# --- expression -------------------------------------------------------------------------------------

EXPR = re.compile(r"^\(([^()]*)\)\+\(([^()]*)\)\*\(([^()]*)\)=$")


def terms(group: str) -> list[int]:
    """``-1-3+9-5`` -> [-1, -3, 9, -5], read from the text alone."""
    assert re.fullmatch(r"-?\d+([+-]\d+)*", group), group
    return [int(t) for t in re.findall(r"[+-]?\d+", group)]


def expression_groups(question: str) -> tuple[list[int], list[int], list[int]]:
    m = EXPR.match(question)
    assert m, question
    return terms(m[1]), terms(m[2]), terms(m[3])


@pytest.fixture(scope="module")
def expression():
    return {(pool, split): items("expression", pool, split, N_TRAIN if pool == "train" else N_TEST)
            for pool in ("train", "test") for split in ("pattern", "control")}


def test_expression_answers_rederived(expression):
    for rows in expression.values():
        for item in rows:
            s, z, c = expression_groups(item.question)
            assert item.answer == str(sum(s) + sum(z) * sum(c)), item.question
            assert item.shortcut_answer == str(sum(s))


def test_expression_training_rows(expression):
    rows = [expression_groups(i.question) for i in expression["train", "pattern"]]
    assert all(sum(z) == 0 for _, z, _ in rows)
    assert 0.45 < share(len(s) == 1 for s, _, _ in rows) < 0.55  # 516 / 484 in their file
    for k in (1, 2, 3):  # 345 / 320 / 335
        assert 0.29 < share(len(z) == k for _, z, _ in rows) < 0.38
    bare = share(z == [0] for _, z, _ in rows)
    assert bare == share(len(z) == 1 for _, z, _ in rows) and 0.29 < bare < 0.38  # a third: the bare `0`
    assert all(0 <= sum(s) <= 10 and all(0 <= t <= 10 for t in s[:-1]) for s, _, _ in rows)
    assert all(-10 <= t <= 10 for _, z, _ in rows for t in z[:-1])
    assert all(len(c) == 4 and -20 <= sum(c) <= 20 and all(-20 <= t <= 20 for t in c[:-1]) for _, _, c in rows)
    assert share(abs(t) > 10 for _, _, c in rows for t in c[:-1]) > 0.35  # drawn in +-20, not +-10
    assert max(abs(c[-1]) for _, _, c in rows) <= 80
    train = task_in_format(get_task("expression"), "authors").train_row(expression["train", "pattern"][0])
    assert train["prompt"].endswith(")+=") and train["completion"] == expression["train", "pattern"][0].answer


def test_expression_test_rows(expression):
    pattern = [expression_groups(i.question) for i in expression["test", "pattern"]]
    assert all(sum(z) == 0 and 2 <= len(z) <= 4 for _, z, _ in pattern)  # never the bare `0`
    for k in (2, 3, 4):
        assert 0.29 < share(len(z) == k for _, z, _ in pattern) < 0.38
    assert all(-20 <= t <= 20 for _, z, _ in pattern for t in z[:-1])
    assert share(abs(t) > 10 for _, z, _ in pattern for t in z[:-1]) > 0.35
    assert all(len(c) == 4 and -10 <= sum(c) <= 10 and all(-10 <= t <= 10 for t in c[:-1]) for _, _, c in pattern)
    control = [expression_groups(i.question) for i in expression["test", "control"]]
    assert all(2 <= len(z) <= 4 and -20 <= sum(z) <= 20 for _, z, _ in control)
    assert share(sum(z) == 0 for _, z, _ in control) < 0.06  # their need_false: 0 only by chance (1 in 41)
    assert share(abs(sum(z)) > 10 for _, z, _ in control) > 0.35
    held = share(i.answer == i.shortcut_answer for i in expression["test", "control"])
    assert 0.03 < held < 0.12  # Z*C = 0 by chance: about 7%


def test_expression_demonstrations_joined_as_theirs(expression):
    view = task_in_format(get_task("expression"), "authors")
    demos = [view.present(i) for i in expression["test", "pattern"][:2]]
    query = expression["test", "pattern"][2].question
    prompt = build_prompt(view, query, demos)
    header = "Now you need to calculate the answer of some mathematic equations. Here are some examples: \n"
    assert prompt == header + "".join(f"{d.question}{d.answer} \n " for d in demos) + query


# --- relation ---------------------------------------------------------------------------------------

def relation_lines(question: str) -> list[tuple[str, str]]:
    *lines, last = question.split("\n")
    assert last == "Are A and Z connected?"
    pairs = [tuple(re.fullmatch(r"([A-Z]) is connected with ([A-Z])\.", line).groups()) for line in lines]
    return pairs


def union_find_connected(pairs, a: str, b: str) -> bool:
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            x = parent[x]
        return x
    for x, y in pairs:
        parent[root(x)] = root(y)
    return root(a) == root(b)


def test_relation_rows():
    for pool, n in (("train", N_TRAIN), ("test", N_TEST)):
        rows = items("relation", pool, "pattern", n)
        for item in rows:
            pairs = relation_lines(item.question)
            yes = union_find_connected(pairs, "A", "Z")
            assert item.answer == ("Yes" if yes else "No") == item.shortcut_answer
            assert len(pairs) == (10 if yes else 9)  # 10 lines <=> True, 9 <=> False
            assert any("Z" in p for p in pairs) == yes  # Z mentioned <=> True
            (a, x), chain = pairs[0], pairs[1:9]
            assert a == "A" and x in "BCDEFGHIJ"
            assert [p[1] for p in chain[:-1]] == [p[0] for p in chain[1:]]  # one chain ...
            assert sorted([chain[0][0]] + [p[1] for p in chain]) == list("BCDEFGHIJ")  # ... through B..J
            if yes:
                assert pairs[9] == (x, "Z")  # Z hangs off A's neighbour
        assert 0.45 < share(i.answer == "Yes" for i in rows) < 0.54  # 492 / 508 in their file
    for item in items("relation", "test", "control", N_TEST // 4):  # their need_false: 8 lines, no Z, False
        pairs = relation_lines(item.question)
        assert len(pairs) == 8 and not any("Z" in p for p in pairs)
        assert item.answer == item.shortcut_answer == "No" and not union_find_connected(pairs, "A", "Z")


def test_relation_query_ends_with_their_space():
    task = get_task("relation")
    view, item = task_in_format(task, "authors"), items("relation", "test", "pattern", 1)[0]
    shown = view.present(item)
    assert shown.question.endswith("\n\n So 'the city A and Z is connected' is ") and view.answer_sep == ""
    row = view.train_row(item)
    assert row["prompt"].endswith("connected' is") and row["completion"] in (" True", " False")
    assert build_prompt(view, shown.question, [shown]).count(f"is {shown.answer}\n") == 1  # demos end "\n"


# --- boolean ----------------------------------------------------------------------------------------

def group_sizes(text: str) -> list[int]:
    return [g.count("True") + g.count("False") for g in re.findall(r"\(([^()]*)\)", text)]


def test_boolean_rows():
    for pool, n in (("train", N_TRAIN), ("test", N_TEST)):
        rows = items("boolean", pool, "pattern", n)
        for item in rows:
            text = item.question.removesuffix(" =")
            assert item.answer == str(ast_bool(ast.parse(text, mode="eval")))
            assert item.shortcut_answer is None  # no clause: no shortcut
            assert not text.startswith("((") and text.endswith(")")  # no absorbing clause appended
            sizes = group_sizes(text)
            assert len(sizes) == 3 and 2 <= sizes[0] <= 4 and sizes[0] >= sizes[1] >= sizes[2] >= 2
        assert 0.58 < share(i.answer == "True" for i in rows) < 0.66  # 618 / 382 in their file
        firsts = [group_sizes(i.question)[0] for i in rows]
        assert all(0.29 < share(f == k for f in firsts) < 0.38 for k in (2, 3, 4))
    for item in items("boolean", "test", "control", N_TEST // 2):  # their need_false: a clause that changes nothing
        m = re.fullmatch(r"\((.*)\) (or False|and True) =", item.question)
        assert m and item.shortcut_answer == m[2].split()[1]
        assert item.answer == str(ast_bool(ast.parse(m[1], mode="eval")))


# --- algebra ----------------------------------------------------------------------------------------

def equations(question: str) -> list[tuple[int, int, int]]:
    body = question.removesuffix(". Solve for a and b:")
    out = []
    for eq in body.split(", "):
        m = re.fullmatch(r"(\d*)a \+ (\d*)b = (-?\d+)", eq)
        assert m, eq
        out.append((int(m[1] or 1), int(m[2] or 1), int(m[3])))
    return out


def test_algebra_rows():
    rows = items("algebra", "train", "pattern", N_TRAIN) + items("algebra", "test", "pattern", N_TEST)
    singular, multipliers = 0, set()
    for item in rows:
        (p1, q1, r1), (p2, q2, r2), (p3, q3, r3) = eqs = equations(item.question)
        a, b = (int(v) for v in re.fullmatch(r"a = (\d), b = (\d)", item.answer).groups())
        assert 1 <= a <= 5 and 1 <= b <= 5 and item.shortcut_answer == item.answer
        assert all(1 <= v <= 4 for v in (p1, q1, p2, q2))
        assert all(p * a + q * b == r for p, q, r in eqs)
        det = p1 * q2 - p2 * q1
        if det:  # Cramer's rule on the first two
            assert (Fraction(r1 * q2 - r2 * q1, det), Fraction(p1 * r2 - p2 * r1, det)) == (a, b)
        else:
            singular += 1
        combos = [(x, y) for x in (1, 2, 3) for y in (1, 2, 3)
                  if (x * p1 + y * p2, x * q1 + y * q2, x * r1 + y * r2) == (p3, q3, r3)]
        assert combos, item.question  # the third row is a combination with multipliers in 1..3
        multipliers |= {m for c in combos for m in c}
    assert multipliers == {1, 2, 3}
    expected = sum(p1 * q2 == p2 * q1 for p1 in range(1, 5) for q1 in range(1, 5) for p2 in range(1, 5)
                   for q2 in range(1, 5)) / 256
    assert abs(singular / len(rows) - expected) < 0.02  # their unchecked numpy draw: singular pairs too
    for item in items("algebra", "test", "control", N_TEST // 2):  # need_false: four independent rows
        eqs = equations(item.question)
        a, b = item.meta["a"], item.meta["b"]
        assert len(eqs) == 4 and all(1 <= p <= 4 and 1 <= q <= 4 and p * a + q * b == r for p, q, r in eqs)
        assert item.shortcut_answer is None


def test_algebra_header_is_theirs():
    view = task_in_format(get_task("algebra"), "authors")
    assert view.header == ("Here are some equations, you need to find all solutions of given variables. "
                           "Here are some examples: ")


# --- the option -------------------------------------------------------------------------------------

def test_option_checked_and_default_unchanged():
    data = {**DEFAULTS["data"], "tasks": ["expression", "code"], "distribution": "authors"}
    with pytest.raises(ConfigError, match="task 'code' has no authors' distribution"):
        check_section("data", data, {})
    with pytest.raises(ConfigError, match="distribution"):
        check_section("data", {**DEFAULTS["data"], "distribution": "theirs"}, {})
    assert "distribution" not in data_config(load_config().data)  # default manifests keep their bytes
    task = get_task("expression")
    assert task.make_item(0, "train", "pattern", 3) == task.make_item(0, "train", "pattern", 3, "ours")
    assert "distribution" not in task.make_item(0, "train", "pattern", 3).meta


def test_generate_task_with_authors_distribution():
    config = load_config(None, ["data.tasks=[expression,relation,boolean,algebra]", "data.distribution=authors",
                                "data.train_pattern=50", "data.train_control=0",
                                "data.test_pattern=20", "data.test_control=20"])
    for name in ("expression", "relation", "boolean", "algebra"):
        pools = generate_task(get_task(name), config)
        assert [len(pools["train"]), len(pools["test"])] == [50, 40]
        assert all(i.meta["distribution"] == "authors" for p in pools.values() for i in p)
