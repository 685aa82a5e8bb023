"""Task 2, ``code`` (irrelevant function): what does a short Python program print?

Every question is a program of 7-13 lines followed by a ``# Output:`` line; the answer follows the
separator (``# Output: 12``). Blank lines are avoided inside a program because multi-line
demonstrations are separated by a blank line in prompts (``iclvsft.prompts``)::

    def function1(x):                      <- FUNCTION1: noisy arithmetic on x (one of the shapes below)
        total = 3
        for i in range(4):
            total += x * 2 - i
        return total
    def function2(z, a):                   <- FUNCTION2: pattern ``return z <op> k`` (ignores a)
        return z + 7
    print(function2(6, function1(6)))      <- v is drawn from ``input_range``
    # Output:

Grammar (all constants drawn from the item's private RNG; ``s``, ``s1``, ``s2`` are ``+`` or ``-``)::

    FUNCTION1 shapes (``function1_shapes``):
      loop         total = c; for i in range(n): total (+=|-=) TERM; return total
                   TERM: x * a - i | i * x + a | x + a * i | (x - i) * a
      power        y = x ** p; y = y s1 a * x; return y s2 b                      (p in 2..3)
      while        n = x + a; steps = 0; while n > b: (n = n // 2 | n -= d); steps += c;
                   return steps (+|-|*) x
      conditional  if (x % m == r | x > t): return x * a s1 b; return (x s2 c) * d
      list         values = [x * i s a for i in range(n)];
                   return (sum(values) - max(values) | sum(values) % m | max(values) + min(values))

    FUNCTION2, split ``pattern``: ``return z <op> k``; a is ignored, so answer = v <op> k.
    FUNCTION2, split ``control`` (``control_shapes``; same surface form, but a is used):
      mod          return z <op> k + a % m
      diff         return (z - a) <op> k
      plus_a       return z <op> k s a
      branch       if a > t: return a <op> k; return z <op> k

``op`` is one of ``+ - * //`` and ``k >= 1``, so every answer is an integer. The shortcut (ignore
function1 and a) always predicts ``v <op> k``: ``shortcut_answer`` is that on both splits. On
``control`` the whole program is redrawn (from the same private RNG) until the true answer differs
from the shortcut; ``meta["attempts"]`` records how many draws that took. function1's value is kept
within ``max_abs_value`` the same way.

The generator computes every answer by its own route, evaluating the drawn structure with Python
arithmetic (it never runs the text). :func:`verify_items` is the independent second route: it runs
the program texts in :mod:`iclvsft.sandbox` and reports every item whose printed output differs from
its answer; the data layer refuses to write data if there is any.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from ..sandbox import run_programs
from .base import Draw, Item, Task, TaskConfig

OPS = ("+", "-", "*", "//")
FUNCTION1_SHAPES = ("loop", "power", "while", "conditional", "list")
CONTROL_SHAPES = ("mod", "diff", "plus_a", "branch")
MAX_ATTEMPTS = 1000  # redraws before giving up (a control item needs ~1.2 draws on average)
_INDENT = "    "


def apply_op(op: str, left: int, right: int) -> int:
    """``left <op> right`` with Python semantics (``//`` floors; the grammar keeps ``right >= 1``)."""
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    if op == "//":
        return left // right
    raise ValueError(f"unknown operator {op!r}")


def _signed(sign: str, left: int, right: int) -> int:
    return left + right if sign == "+" else left - right


# --------------------------------------------------------------------------------------------------
# function1: each shape draws its parameters, renders its body lines and evaluates itself.
# --------------------------------------------------------------------------------------------------

_LOOP_TERMS: dict[str, tuple[str, Callable[[int, int, int], int]]] = {
    "x*a-i": ("x * {a} - i", lambda x, i, a: x * a - i),
    "i*x+a": ("i * x + {a}", lambda x, i, a: i * x + a),
    "x+a*i": ("x + {a} * i", lambda x, i, a: x + a * i),
    "(x-i)*a": ("(x - i) * {a}", lambda x, i, a: (x - i) * a),
}


def _draw_loop(rng: random.Random, cfg: CodeConfig) -> dict[str, Any]:
    return {"start": rng.randint(-9, 9), "n": rng.randint(2, 6), "acc": rng.choice(["+=", "-="]),
            "term": rng.choice(sorted(_LOOP_TERMS)), "a": rng.randint(1, 9)}


def _lines_loop(p: dict[str, Any]) -> list[str]:
    term = _LOOP_TERMS[p["term"]][0].format(a=p["a"])
    return [f"total = {p['start']}", f"for i in range({p['n']}):", f"{_INDENT}total {p['acc']} {term}",
            "return total"]


def _value_loop(p: dict[str, Any], x: int) -> int:
    total = p["start"]
    for i in range(p["n"]):
        term = _LOOP_TERMS[p["term"]][1](x, i, p["a"])
        total = total + term if p["acc"] == "+=" else total - term
    return total


def _draw_power(rng: random.Random, cfg: CodeConfig) -> dict[str, Any]:
    return {"p": rng.randint(2, 3), "s1": rng.choice("+-"), "a": rng.randint(1, 9), "s2": rng.choice("+-"),
            "b": rng.randint(1, 20)}


def _lines_power(p: dict[str, Any]) -> list[str]:
    return [f"y = x ** {p['p']}", f"y = y {p['s1']} {p['a']} * x", f"return y {p['s2']} {p['b']}"]


def _value_power(p: dict[str, Any], x: int) -> int:
    y = x ** p["p"]
    y = _signed(p["s1"], y, p["a"] * x)
    return _signed(p["s2"], y, p["b"])


def _draw_while(rng: random.Random, cfg: CodeConfig) -> dict[str, Any]:
    return {"a": rng.randint(5, 30), "b": rng.randint(0, 5), "update": rng.choice(["half", "minus"]),
            "d": rng.randint(2, 5), "c": rng.randint(1, 9), "ret": rng.choice(["+", "-", "*"])}


def _lines_while(p: dict[str, Any]) -> list[str]:
    update = "n = n // 2" if p["update"] == "half" else f"n -= {p['d']}"
    return [f"n = x + {p['a']}", "steps = 0", f"while n > {p['b']}:", f"{_INDENT}{update}",
            f"{_INDENT}steps += {p['c']}", f"return steps {p['ret']} x"]


def _value_while(p: dict[str, Any], x: int) -> int:
    n, steps = x + p["a"], 0
    while n > p["b"]:  # terminates: b >= 0, and n // 2 < n for n >= 1, d >= 2
        n = n // 2 if p["update"] == "half" else n - p["d"]
        steps += p["c"]
    return apply_op(p["ret"], steps, x)


def _draw_conditional(rng: random.Random, cfg: CodeConfig) -> dict[str, Any]:
    m = rng.randint(2, 4)
    return {"cond": rng.choice(["mod", "gt"]), "m": m, "r": rng.randint(0, m - 1),
            "t": rng.randint(*cfg.input_range), "a": rng.randint(2, 9), "s1": rng.choice("+-"),
            "b": rng.randint(1, 20), "s2": rng.choice("+-"), "c": rng.randint(1, 9), "d": rng.randint(2, 9)}


def _lines_conditional(p: dict[str, Any]) -> list[str]:
    cond = f"x % {p['m']} == {p['r']}" if p["cond"] == "mod" else f"x > {p['t']}"
    return [f"if {cond}:", f"{_INDENT}return x * {p['a']} {p['s1']} {p['b']}",
            f"return (x {p['s2']} {p['c']}) * {p['d']}"]


def _value_conditional(p: dict[str, Any], x: int) -> int:
    taken = x % p["m"] == p["r"] if p["cond"] == "mod" else x > p["t"]
    if taken:
        return _signed(p["s1"], x * p["a"], p["b"])
    return _signed(p["s2"], x, p["c"]) * p["d"]


_LIST_RETURNS: dict[str, tuple[str, Callable[[list[int], int], int]]] = {
    "sum-max": ("sum(values) - max(values)", lambda v, m: sum(v) - max(v)),
    "sum%m": ("sum(values) % {m}", lambda v, m: sum(v) % m),
    "max+min": ("max(values) + min(values)", lambda v, m: max(v) + min(v)),
}


def _draw_list(rng: random.Random, cfg: CodeConfig) -> dict[str, Any]:
    return {"n": rng.randint(3, 6), "s": rng.choice("+-"), "a": rng.randint(1, 9),
            "ret": rng.choice(sorted(_LIST_RETURNS)), "m": rng.randint(3, 11)}


def _lines_list(p: dict[str, Any]) -> list[str]:
    return [f"values = [x * i {p['s']} {p['a']} for i in range({p['n']})]",
            "return " + _LIST_RETURNS[p["ret"]][0].format(m=p["m"])]


def _value_list(p: dict[str, Any], x: int) -> int:
    values = [_signed(p["s"], x * i, p["a"]) for i in range(p["n"])]
    return _LIST_RETURNS[p["ret"]][1](values, p["m"])


@dataclass(frozen=True)
class _Shape:
    draw: Callable[[random.Random, CodeConfig], dict[str, Any]]
    lines: Callable[[dict[str, Any]], list[str]]
    value: Callable[[dict[str, Any], int], int]


_FUNCTION1: dict[str, _Shape] = {
    "loop": _Shape(_draw_loop, _lines_loop, _value_loop),
    "power": _Shape(_draw_power, _lines_power, _value_power),
    "while": _Shape(_draw_while, _lines_while, _value_while),
    "conditional": _Shape(_draw_conditional, _lines_conditional, _value_conditional),
    "list": _Shape(_draw_list, _lines_list, _value_list),
}
assert tuple(_FUNCTION1) == FUNCTION1_SHAPES


# --------------------------------------------------------------------------------------------------
# function2: the pattern form ignores a; each control form uses it. ``z <op> k`` appears in all.
# --------------------------------------------------------------------------------------------------

def _draw_function2(rng: random.Random, shape: str) -> dict[str, Any]:
    if shape == "mod":
        return {"m": rng.randint(2, 9)}
    if shape == "plus_a":
        return {"s": rng.choice("+-")}
    if shape == "branch":
        return {"t": rng.randint(-10, 20)}
    return {}  # "ignore_a" (pattern) and "diff" have no constants of their own


def _lines_function2(shape: str, op: str, k: int, p: dict[str, Any]) -> list[str]:
    if shape == "ignore_a":
        return [f"return z {op} {k}"]
    if shape == "mod":
        return [f"return z {op} {k} + a % {p['m']}"]
    if shape == "diff":
        return [f"return (z - a) {op} {k}"]
    if shape == "plus_a":
        return [f"return z {op} {k} {p['s']} a"]
    if shape == "branch":
        return [f"if a > {p['t']}:", f"{_INDENT}return a {op} {k}", f"return z {op} {k}"]
    raise ValueError(f"unknown function2 shape {shape!r}")


def _value_function2(shape: str, op: str, k: int, p: dict[str, Any], z: int, a: int) -> int:
    if shape == "ignore_a":
        return apply_op(op, z, k)
    if shape == "mod":
        return apply_op(op, z, k) + a % p["m"]
    if shape == "diff":
        return apply_op(op, z - a, k)
    if shape == "plus_a":
        return _signed(p["s"], apply_op(op, z, k), a)
    if shape == "branch":
        return apply_op(op, a if a > p["t"] else z, k)
    raise ValueError(f"unknown function2 shape {shape!r}")


# --------------------------------------------------------------------------------------------------
# Config and task
# --------------------------------------------------------------------------------------------------

@dataclass
class CodeConfig(TaskConfig):
    """Knobs of the code task (defaults: docs/data.md, the code task).

    input_range       v, the program's input, is drawn from [lo, hi] (within [-100, 100]).
    k_range           function2's constant k (k >= 1, so ``//`` never divides by zero).
    ops               function2's operators, a subset of ``+ - * //``.
    function1_shapes  which function1 shapes to draw from (see the module docstring).
    control_shapes    which function2 forms that use ``a`` the control split draws from.
    max_abs_value     bound on |function1(v)|; a draw beyond it is redrawn.
    """

    input_range: tuple[int, int] = (0, 10)
    k_range: tuple[int, int] = (1, 9)
    ops: tuple[str, ...] = OPS
    function1_shapes: tuple[str, ...] = FUNCTION1_SHAPES
    control_shapes: tuple[str, ...] = CONTROL_SHAPES
    max_abs_value: int = 10_000

    def validate(self) -> None:
        self._check_range("input_range", -100, 100)
        self._check_range("k_range", 1, 99)
        self._check_choices("ops", OPS)
        self._check_choices("function1_shapes", FUNCTION1_SHAPES)
        self._check_choices("control_shapes", CONTROL_SHAPES)
        self._check(isinstance(self.max_abs_value, int) and not isinstance(self.max_abs_value, bool)
                    and 1_000 <= self.max_abs_value <= 10**9,
                    f"max_abs_value must be an integer in [1000, 1e9], got {self.max_abs_value!r}")

    def _check_choices(self, name: str, allowed: tuple[str, ...]) -> None:
        value = getattr(self, name)
        self._check(isinstance(value, (list, tuple)) and len(value) > 0,
                    f"{name} must be a non-empty list drawn from {list(allowed)}, got {value!r}")
        unknown = [v for v in value if v not in allowed]
        self._check(not unknown, f"{name}: unknown value(s) {unknown!r}; choose from {list(allowed)}")
        self._check(len(set(value)) == len(value), f"{name} has repeated values: {value!r}")


class CodeTask(Task):
    """Python programs whose printed value ignores function1 on ``pattern`` (see the module docstring)."""

    name = "code"
    config_cls = CodeConfig
    header = "What does each Python program print?"
    answer_sep = " "
    multiline = True
    answer_format = "int"
    corruptions = ("answer",)
    config: CodeConfig

    def generate(self, rng: random.Random, split: str) -> Draw:
        cfg = self.config
        for attempt in range(1, MAX_ATTEMPTS + 1):
            shape = rng.choice(list(cfg.function1_shapes))
            params = _FUNCTION1[shape].draw(rng, cfg)
            v = rng.randint(*cfg.input_range)
            op = rng.choice(list(cfg.ops))
            k = rng.randint(*cfg.k_range)
            f2_shape = "ignore_a" if split == "pattern" else rng.choice(list(cfg.control_shapes))
            f2_params = _draw_function2(rng, f2_shape)
            a = _FUNCTION1[shape].value(params, v)
            if abs(a) > cfg.max_abs_value:
                continue
            answer = _value_function2(f2_shape, op, k, f2_params, v, a)
            shortcut = apply_op(op, v, k)
            if split == "control" and answer == shortcut:
                continue
            question = render_program(shape, params, f2_shape, op, k, f2_params, v)
            meta = {"v": v, "op": op, "k": k, "function1_shape": shape, "function1_params": params,
                    "function1_value": a, "function2_shape": f2_shape, "function2_params": f2_params,
                    "attempts": attempt}
            return Draw(question=question, answer=str(answer), shortcut_answer=str(shortcut), meta=meta)
        raise DataError(f"code task: no valid {split} program in {MAX_ATTEMPTS} draws; widen input_range, k_range, "
                        f"ops or the shapes, or raise max_abs_value (config {cfg.to_dict()})")

    def corrupt(self, item: Item, kind: str, rng) -> Iterator[tuple[str, str, str]]:
        """answer: the program's input v moved to another value of ``input_range`` (the same program
        otherwise), the answer recomputed through both functions as ``generate`` does; inputs whose
        function1 value leaves ``max_abs_value`` are skipped; the new values in random order."""
        self.check_corruption(kind)
        m, cfg = item.meta, self.config
        args = (m["function1_shape"], m["function1_params"], m["function2_shape"], m["op"], m["k"],
                m["function2_params"])
        if render_program(*args, m["v"]) != item.question:
            raise DataError(f"{item.id}: the program cannot be rebuilt from meta (generator changed?)")
        values = [x for x in range(cfg.input_range[0], cfg.input_range[1] + 1) if x != m["v"]]
        rng.shuffle(values)
        for v in values:
            a = _FUNCTION1[m["function1_shape"]].value(m["function1_params"], v)
            if abs(a) > cfg.max_abs_value:
                continue
            answer = _value_function2(m["function2_shape"], m["op"], m["k"], m["function2_params"], v, a)
            yield render_program(*args, v), str(answer), f"v {m['v']} -> {v}"

    def verify(self, items: Sequence[Item], **sandbox_options: Any) -> list[str]:
        """Ids of the items whose program, run in the sandbox, does not print exactly its answer."""
        return verify_items(items, **sandbox_options)


def render_program(shape: str, params: dict[str, Any], f2_shape: str, op: str, k: int,
                   f2_params: dict[str, Any], v: int) -> str:
    """The question text: both functions, the print call and the ``# Output:`` line."""
    lines = ["def function1(x):", *(_INDENT + line for line in _FUNCTION1[shape].lines(params)),
             "def function2(z, a):", *(_INDENT + line for line in _lines_function2(f2_shape, op, k, f2_params)),
             f"print(function2({v}, function1({v})))", "# Output:"]
    return "\n".join(lines)


def verify_items(items: Sequence[Item], timeout_s: float = 1.0, total_timeout_s: float = 120.0,
                 degraded_ok: bool | None = None) -> list[str]:
    """Run every item's program in :mod:`iclvsft.sandbox` (one batch, one child process) and return
    the ids of the items whose printed output is not exactly ``answer`` plus a newline (an error,
    a timeout or a different value). The question text is itself the program (``# Output:`` is a
    comment). An empty list means every answer was confirmed by actually running the program.
    Where the sandbox lacks an OS layer, raises ``SandboxUnavailable`` unless ``degraded_ok`` (None:
    the enclosing ``sandbox.session``'s; the data layer's is ``data.sandbox_degraded_ok``)."""
    results = run_programs([item.question for item in items], timeout_s=timeout_s, total_timeout_s=total_timeout_s,
                           degraded_ok=degraded_ok)
    return [item.id for item, result in zip(items, results)
            if result.error is not None or result.stdout != f"{item.answer}\n"]


__all__ = ["CONTROL_SHAPES", "FUNCTION1_SHAPES", "OPS", "CodeConfig", "CodeTask", "apply_op", "render_program",
           "verify_items"]
