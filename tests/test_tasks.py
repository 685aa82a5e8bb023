"""Registry-wide task tests: every answer re-derived by a second, independent route; split
invariants; determinism; config validation."""
import ast
import operator
import re
from fractions import Fraction

import pytest
from conftest import ast_bool

from iclvsft.errors import ConfigError
from iclvsft.prompts import completion_text
from iclvsft.scoring import score
from iclvsft.tasks import TASKS, get_task

N = 1000  # items per split per task


def items_of(task, split, n=N, seed=7, pool="train"):
    return [task.make_item(seed, pool, split, i) for i in range(n)]


# --- second routes -----------------------------------------------------------------------------

_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def ast_arith(node):
    if isinstance(node, ast.Expression):
        return ast_arith(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -ast_arith(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        return _ARITH[type(node.op)](ast_arith(node.left), ast_arith(node.right))
    raise AssertionError(f"unexpected node {ast.dump(node)}")


def union_find_connected(question, a="A", b="Z"):
    parent = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for line in question.splitlines():
        m = re.fullmatch(r"([A-Z]) is connected with ([A-Z])\.", line)
        if m:
            parent[find(m.group(1))] = find(m.group(2))
        else:
            assert line == "Are A and Z connected?", line
    return find(a) == find(b)


def solve_rational(question):
    eqs = []
    for p, q, r in re.findall(r"(\d*)a \+ (\d*)b = (-?\d+)", question):
        eqs.append((Fraction(int(p or 1)), Fraction(int(q or 1)), Fraction(int(r))))
    assert len(eqs) == 3, question
    (p1, q1, r1), (p2, q2, r2), _ = eqs
    det = p1 * q2 - p2 * q1
    a, b = (r1 * q2 - r2 * q1) / det, (p1 * r2 - p2 * r1) / det
    return eqs, a, b


def second_route(task_name, item):
    q = item.question
    if task_name == "expression":
        assert q.endswith("=")
        return str(ast_arith(ast.parse(q[:-1], mode="eval")))
    if task_name == "boolean":
        assert q.endswith(" =")
        return str(ast_bool(ast.parse(q[:-2], mode="eval")))
    if task_name == "relation":
        return "Yes" if union_find_connected(q) else "No"
    if task_name == "parity":
        numbers = [int(x) for x in re.findall(r"\d+", q)]
        assert 8 <= len(numbers) <= 16 and all(10 <= n <= 999 for n in numbers)
        return "odd" if sum(numbers) % 2 else "even"
    if task_name == "algebra":
        eqs, a, b = solve_rational(q)
        assert all(p * a + q_ * b == r for p, q_, r in eqs)
        assert a.denominator == b.denominator == 1
        return f"a = {a}, b = {b}"
    raise AssertionError(task_name)


@pytest.mark.parametrize("name", [n for n in TASKS if n != "code"])
def test_answers_rederived_independently(name):
    task = get_task(name)
    for split in task.splits:
        for item in items_of(task, split):
            assert second_route(name, item) == item.answer, item


def test_code_answers_confirmed_by_running_the_programs():
    task = get_task("code")
    items = [i for split in task.splits for i in items_of(task, split)]
    assert task.verify(items) == []


@pytest.mark.parametrize("name", list(TASKS))
def test_split_invariants_and_gold_scores(name):
    task = get_task(name)
    assert set(task.splits) <= {"pattern", "control"}
    for split in task.splits:
        items = items_of(task, split)
        answers = {i.answer for i in items}
        if (name, split) != ("relation", "control"):  # by definition always "No" (see relation.py)
            assert len(answers) >= 2, f"{name}/{split} has a constant answer"
        for item in items:
            assert item.task == name and item.split == split
            if split == "pattern":
                assert item.shortcut_answer == item.answer
            else:
                assert item.shortcut_answer != item.answer
            s = score(item, completion_text(task, item.answer), task.answer_format)
            assert s.correct and not s.invalid, (item, s)
            assert s.shortcut == (split == "pattern")
            assert {"seed", "pool", "index"} <= set(item.meta)


def test_relation_pattern_shortcut_is_z_mentioned_and_control_is_never_connected():
    task = get_task("relation")
    for item in items_of(task, "pattern", 300):
        assert ("Z is" in item.question or "with Z." in item.question) == (item.answer == "Yes")
        n_lines = item.question.count(" is connected with ")
        assert (n_lines % 2 == 1) == (item.answer == "Yes")  # the authors' line-count cue
    for item in items_of(task, "control", 300):
        assert "Z" in item.question.replace("A and Z", "") and item.answer == "No"


def test_algebra_pattern_third_equation_is_a_combination_and_control_is_not():
    task = get_task("algebra")
    for split in ("pattern", "control"):
        for item in items_of(task, split, 300):
            eqs, _, _ = solve_rational(item.question)
            (p1, q1, r1), (p2, q2, r2), (p3, q3, r3) = eqs
            combos = {(x * p1 + y * p2, x * q1 + y * q2, x * r1 + y * r2) for x in (1, 2) for y in (1, 2)}
            assert ((p3, q3, r3) in combos) == (split == "pattern"), item


def test_expression_groups_follow_the_spec():
    task = get_task("expression")
    for split in ("pattern", "control"):
        for item in items_of(task, split, 300):
            s, z, c = item.meta["S"], item.meta["Z"], item.meta["C"]
            assert 1 <= len(s) <= 2 and 0 <= sum(s) <= 10 and 2 <= len(z) <= 4 and len(c) == 4
            assert (sum(z) == 0) == (split == "pattern")
            assert item.shortcut_answer == str(sum(s))


@pytest.mark.parametrize("name", list(TASKS))
def test_items_are_deterministic_and_seed_dependent(name):
    task = get_task(name)
    split = task.splits[-1]
    a = [task.make_item(1, "train", split, i) for i in range(50)]
    b = [task.make_item(1, "train", split, i) for i in range(50)]
    c = [task.make_item(2, "train", split, i) for i in range(50)]
    d = [task.make_item(1, "test", split, i) for i in range(50)]
    assert a == b
    assert sum(x.question != y.question for x, y in zip(a, c)) > 40
    assert sum(x.question != y.question for x, y in zip(a, d)) > 40


@pytest.mark.parametrize("name, bad", [
    ("expression", {"z_terms": [1, 3]}),
    ("expression", {"s_target": [5, 1]}),
    ("expression", {"control_z_sum": [0, 0]}),
    ("boolean", {"group_size": [0, 2]}),
    ("relation", {"chain_edges": [2, 40]}),
    ("parity", {"length": "8-16"}),
    ("algebra", {"multipliers": [0, 1]}),
    ("code", {"no_such_key": 1}),
    ("expression", {"z_term": [2, 4]}),
])
def test_bad_task_config_is_refused(name, bad):
    with pytest.raises(ConfigError):
        get_task(name, bad)


def test_unknown_task_is_refused():
    with pytest.raises(ConfigError, match="unknown task 'expresion'"):
        get_task("expresion")


def test_task_config_overrides_change_items():
    task = get_task("expression", {"z_terms": [2, 2]})
    assert all(len(task.make_item(0, "train", "pattern", i).meta["Z"]) == 2 for i in range(100))
