"""Task 6, algebra (redundant equation).

Three linear equations in a and b (a, b in 1..5, coefficients of the first two in 1..4), e.g.::

    2a + 3b = 13, a + 4b = 14, 4a + 10b = 40. Solve for a and b:   ->   a = 2, b = 3

* pattern: the third equation is a combination alpha*eq1 + beta*eq2 (alpha, beta from
  ``multipliers``), so it carries no information: the answer follows from the first two alone.
* control: the third equation has the same look (it starts from such a combination, then one of
  its coefficients is moved by ``perturbation``) but is no longer a combination with those
  multipliers and is not parallel to either equation; it still has the same solution.

About ``shortcut_answer``: here the shortcut ("ignore the redundant equation and solve the first
two") gives the *correct* answer on control too, because all three equations share the solution.
No answer-level shortcut exists to measure, so control items carry ``shortcut_answer = None`` and
the shortcut rate is reported as not applicable for this task; pattern vs control accuracy is still
the comparison that shows whether a model relies on the redundancy.

The authors' distribution (``data.distribution: authors``, docs/authors-data.md): ``generate_authors``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import DataError
from .base import Draw, Item, Task, TaskConfig
from .formats import AuthorsFormat


@dataclass
class AlgebraConfig(TaskConfig):
    solution_range: tuple[int, int] = (1, 5)
    coefficient_range: tuple[int, int] = (1, 4)
    multipliers: tuple[int, ...] = (1, 2)
    perturbation: tuple[int, int] = (1, 2)  # |change| of one coefficient on control

    def validate(self) -> None:
        self._check_range("solution_range", lo_min=-99, hi_max=99)
        self._check_range("coefficient_range", lo_min=1, hi_max=20)
        self._check_range("perturbation", lo_min=1, hi_max=20)
        self._check(len(self.multipliers) >= 1 and all(isinstance(m, int) and m >= 1 for m in self.multipliers),
                    f"multipliers must be positive integers, got {self.multipliers!r}")
        lo, hi = self.coefficient_range
        self._check((hi - lo + 1) ** 2 >= 3, "coefficient_range too small for two independent equations")


def format_equation(p: int, q: int, r: int) -> str:
    """``(2, 1, 7)`` -> ``2a + b = 7``."""
    def term(c: int, v: str) -> str:
        return v if c == 1 else f"{c}{v}"
    return f"{term(p, 'a')} + {term(q, 'b')} = {r}"


class AlgebraTask(Task):
    name = "algebra"
    config_cls = AlgebraConfig
    header = "Solve each system of equations for a and b."
    answer_format = "pair"
    corruptions = ("answer",)
    answer_prefix = "a = "
    authors_format = AuthorsFormat(
        header="Here are some equations, you need to find all solutions of given variables. Here are some examples: ",
        multiline=True, answer_format="int", max_new_tokens=1, answer_factor="giveaway", query_space=True,
        demo_sep="\n")
    authors_distribution = True

    @staticmethod
    def _authors_lines(item: Item) -> str:
        """``1a + 4b = 13`` per line (their coefficients are always written, 1 included)."""
        return "\n".join(f"{p}a + {q}b = {r}" for p, q, r in item.meta["equations"])

    def authors_item(self, item: Item, ours: frozenset[str] = frozenset()) -> Item:
        """question: their lines, then `` The solutions are:``; giveaway: the query goes on `` a = 5, b =``
        (the view adds their trailing space) and the answer is b alone, ``2``. Their training text asks for
        both: ``... The solutions are: a = 5, b = 2``."""
        question = item.question if "question" in ours else f"{self._authors_lines(item)}\n The solutions are:"
        if "giveaway" in ours:
            return dataclasses.replace(item, question=question)
        b = item.meta["b"]
        return dataclasses.replace(item, question=f"{question} a = {item.meta['a']}, b =", answer=str(b),
                                   shortcut_answer=str(b) if item.shortcut_answer is not None else None)

    def generate(self, rng, split: str) -> Draw:
        c = self.config
        a, b = rng.randint(*c.solution_range), rng.randint(*c.solution_range)
        while True:
            p1, q1, p2, q2 = (rng.randint(*c.coefficient_range) for _ in range(4))
            if p1 * q2 - p2 * q1 != 0:  # the first two determine (a, b)
                break
        alpha, beta = rng.choice(c.multipliers), rng.choice(c.multipliers)
        p3, q3 = alpha * p1 + beta * p2, alpha * q1 + beta * q2
        perturbed = None
        if split == "control":
            combos = {(x * p1 + y * p2, x * q1 + y * q2) for x in c.multipliers for y in c.multipliers}
            while True:
                which = rng.choice("pq")
                delta = rng.randint(*c.perturbation) * rng.choice((-1, 1))
                cand = (p3 + delta, q3) if which == "p" else (p3, q3 + delta)
                parallel = any(cand[0] * qq - cand[1] * pp == 0 for pp, qq in ((p1, q1), (p2, q2)))
                if min(cand) >= 1 and cand not in combos and not parallel:
                    break
            p3, q3 = cand
            perturbed = {"coefficient": which, "delta": delta}
        equations = [(p1, q1, p1 * a + q1 * b), (p2, q2, p2 * a + q2 * b), (p3, q3, p3 * a + q3 * b)]
        question = ", ".join(format_equation(*e) for e in equations) + ". Solve for a and b:"
        answer = f"a = {a}, b = {b}"
        return Draw(question=question, answer=answer, shortcut_answer=answer if split == "pattern" else None,
                    meta={"a": a, "b": b, "equations": [list(e) for e in equations], "alpha": alpha, "beta": beta,
                          "perturbed": perturbed})

    def generate_authors(self, rng, pool: str, split: str) -> Draw:
        """Their ``generate_linear_equations`` (training and evaluation alike): a, b in 1..5, the first two
        rows' coefficients in 1..4 with no check (the pair can be singular: then the three rows do not
        determine a and b, and the gold is the drawn pair, as in their data), the third row alpha*row_i +
        beta*row_j for the two rows in random order, alpha and beta in 1..3. Their "need_false" (control)
        is four independent rows (coefficients in 1..4) with the same solution: no shortcut answer."""
        a, b = rng.randint(1, 5), rng.randint(1, 5)
        n_rows = 4 if split == "control" else 2
        rows = [(rng.randint(1, 4), rng.randint(1, 4)) for _ in range(n_rows)]
        alpha = beta = order = None
        if split == "pattern":
            order = rng.sample(range(2), 2)
            alpha, beta = rng.randint(1, 3), rng.randint(1, 3)
            first, second = rows[order[0]], rows[order[1]]
            rows.append((alpha * first[0] + beta * second[0], alpha * first[1] + beta * second[1]))
        equations = [(p, q, p * a + q * b) for p, q in rows]
        question = ", ".join(format_equation(*e) for e in equations) + ". Solve for a and b:"
        answer = f"a = {a}, b = {b}"
        singular = rows[0][0] * rows[1][1] - rows[0][1] * rows[1][0] == 0
        return Draw(question=question, answer=answer, shortcut_answer=answer if split == "pattern" else None,
                    meta={"a": a, "b": b, "equations": [list(e) for e in equations], "alpha": alpha, "beta": beta,
                          "order": order, "singular": singular})

    def corrupt(self, item: Item, kind: str, rng) -> Iterator[tuple[str, str, str]]:
        """answer: a moved to another value of ``solution_range`` with the same coefficients (every
        right-hand side is recomputed, so the system stays consistent and its solution is (a', b));
        the new values in random order."""
        self.check_corruption(kind)
        a, b, equations = item.meta["a"], item.meta["b"], [tuple(e) for e in item.meta["equations"]]
        if ", ".join(format_equation(*e) for e in equations) + ". Solve for a and b:" != item.question:
            raise DataError(f"{item.id}: the question cannot be rebuilt from meta (generator changed?)")
        values = [x for x in range(self.config.solution_range[0], self.config.solution_range[1] + 1) if x != a]
        rng.shuffle(values)
        for new_a in values:
            system = [(p, q, p * new_a + q * b) for p, q, _ in equations]
            question = ", ".join(format_equation(*e) for e in system) + ". Solve for a and b:"
            yield question, f"a = {new_a}, b = {b}", f"a {a} -> {new_a}"
