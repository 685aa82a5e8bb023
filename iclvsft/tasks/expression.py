"""Task 1, expression (reducible term): ``(S)+(Z)*(C)=``.

S has 1-2 terms summing to a target in [0, 10]; Z has 2-4 terms in [-20, 20]; C exactly 4 terms in
[-10, 10]. In each group the first n-1 terms are drawn and the last one is forced to hit the group's
target (so it may leave the range). Authors' examples: ``(1+6)+(-3+3)*(-1-3+9-5)=7``.

* pattern: Z sums to 0, so the answer is sum(S) whatever C is (the shortcut: read off S).
* control: Z sums to a small non-zero value and C to a non-zero one, so the answer S + Z*C differs
  from the shortcut answer S.

The authors' distribution (``data.distribution: authors``, docs/authors-data.md) is in
``AUTHORS_POOLS``: their training file and their evaluation-time generator differ in Z and C.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import DataError
from .base import Draw, Item, Task, TaskConfig
from .formats import AuthorsFormat


@dataclass
class ExpressionConfig(TaskConfig):
    s_terms: tuple[int, int] = (1, 2)  # number of terms in S
    s_target: tuple[int, int] = (0, 10)  # sum(S)
    s_range: tuple[int, int] = (0, 10)  # range of the drawn (non-final) S terms
    z_terms: tuple[int, int] = (2, 4)
    z_range: tuple[int, int] = (-20, 20)
    c_terms: tuple[int, int] = (4, 4)
    c_range: tuple[int, int] = (-10, 10)
    c_target: tuple[int, int] = (-10, 10)  # sum(C); control draws a non-zero one
    control_z_sum: tuple[int, int] = (-3, 3)  # sum(Z) on control, 0 excluded

    def validate(self) -> None:
        for name in ("s_terms", "z_terms", "c_terms"):
            self._check_range(name, lo_min=1, hi_max=8)
        self._check(self.z_terms[0] >= 2, "z_terms must allow at least 2 terms (a zero-sum group needs two)")
        for name in ("s_target", "s_range", "z_range", "c_range", "c_target", "control_z_sum"):
            self._check_range(name)
        self._check(self.control_z_sum != (0, 0), "control_z_sum must contain a non-zero value")
        self._check(self.c_target != (0, 0), "c_target must contain a non-zero value (control needs Z*C != 0)")


def format_group(terms: list[int]) -> str:
    """``[-1, -3, 9, -5]`` -> ``(-1-3+9-5)``."""
    text = str(terms[0]) + "".join(f"+{t}" if t >= 0 else str(t) for t in terms[1:])
    return f"({text})"


def draw_group(rng, n_terms: int, value_range: tuple[int, int], target: int) -> list[int]:
    """n-1 terms drawn from ``value_range``, the last forced so the group sums to ``target``."""
    head = [rng.randint(*value_range) for _ in range(n_terms - 1)]
    return head + [target - sum(head)]


@dataclass(frozen=True)
class AuthorsGroups:
    """One of the authors' expression generators: (terms, drawn-term range, target range) per group."""

    s: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    z: tuple[tuple[int, int], tuple[int, int]]  # terms, drawn range; target 0 (pattern) or drawn in range
    c: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


# pool -> the authors' generator for it. train: their training file (Z of 1-3 terms in +-10, so a third
# of the rows have the bare zero group ``(0)``; C's drawn terms and target in +-20, as measured in the
# file); test: their evaluation code (Z of 2-4 terms in +-20, C in +-10). S is the same in both.
AUTHORS_POOLS = {
    "train": AuthorsGroups(s=((1, 2), (0, 10), (0, 10)), z=((1, 3), (-10, 10)), c=((4, 4), (-20, 20), (-20, 20))),
    "test": AuthorsGroups(s=((1, 2), (0, 10), (0, 10)), z=((2, 4), (-20, 20)), c=((4, 4), (-10, 10), (-10, 10))),
}


class ExpressionTask(Task):
    name = "expression"
    config_cls = ExpressionConfig
    header = "Compute the value of each expression."
    answer_sep = ""  # the authors' format: "...=7"
    answer_format = "int"
    corruptions = ("answer", "control")
    authors_format = AuthorsFormat(
        header="Now you need to calculate the answer of some mathematic equations. Here are some examples: ",
        multiline=False, answer_format="int", max_new_tokens=3, demo_sep=" \n ")
    authors_distribution = True

    def authors_item(self, item: Item, ours: frozenset[str] = frozenset()) -> Item:
        """Their test queries are ours: ``(S)+(Z)*(C)=`` then the value (their question factor is the
        demonstrations' separator alone, which the view holds)."""
        return item

    def authors_train_question(self, question: str) -> str:
        """Their training rows use an older format, ``(0+2)+(3+0-3)*(-3+1-9+4)+=2``."""
        return question.removesuffix("=") + "+="

    def generate(self, rng, split: str) -> Draw:
        c = self.config
        s_target = rng.randint(*c.s_target)
        s = draw_group(rng, rng.randint(*c.s_terms), c.s_range, s_target)
        if split == "pattern":
            z_sum = 0
            c_sum = rng.randint(*c.c_target)
        else:
            z_sum = rng.choice([v for v in range(c.control_z_sum[0], c.control_z_sum[1] + 1) if v != 0])
            c_sum = rng.choice([v for v in range(c.c_target[0], c.c_target[1] + 1) if v != 0])
        z = draw_group(rng, rng.randint(*c.z_terms), c.z_range, z_sum)
        cc = draw_group(rng, rng.randint(*c.c_terms), c.c_range, c_sum)
        answer = s_target + z_sum * c_sum
        question = f"{format_group(s)}+{format_group(z)}*{format_group(cc)}="
        return Draw(question=question, answer=str(answer), shortcut_answer=str(s_target),
                    meta={"S": s, "Z": z, "C": cc})

    def generate_authors(self, rng, pool: str, split: str) -> Draw:
        """Their ``build_expression``: a group of one term is its target alone (Z: the bare ``0``). Their
        "need_false" (control) draws Z's target in Z's range, so Z*C is 0 by chance in some control items
        (then the answer is S and the shortcut holds there too, as in their evaluation)."""
        g = AUTHORS_POOLS[pool]
        s_target = rng.randint(*g.s[2])
        s = draw_group(rng, rng.randint(*g.s[0]), g.s[1], s_target)
        z_sum = 0 if split == "pattern" else rng.randint(*g.z[1])
        z = draw_group(rng, rng.randint(*g.z[0]), g.z[1], z_sum)
        c_sum = rng.randint(*g.c[2])
        cc = draw_group(rng, rng.randint(*g.c[0]), g.c[1], c_sum)
        question = f"{format_group(s)}+{format_group(z)}*{format_group(cc)}="
        return Draw(question=question, answer=str(s_target + z_sum * c_sum), shortcut_answer=str(s_target),
                    meta={"S": s, "Z": z, "C": cc})

    def corrupt(self, item: Item, kind: str, rng) -> Iterator[tuple[str, str, str]]:
        """answer: one term of S +-1..9 (sum(S), the answer, changes); control: one term of Z +-1..3, so a
        pattern item becomes its control twin (Z no longer sums to 0) and a control item its pattern twin.
        The group's last term first, the deltas in random order."""
        self.check_corruption(kind)
        groups = {g: list(item.meta[g]) for g in ("S", "Z", "C")}
        rebuilt = f"{format_group(groups['S'])}+{format_group(groups['Z'])}*{format_group(groups['C'])}="
        if rebuilt != item.question:
            raise DataError(f"{item.id}: the question cannot be rebuilt from meta S/Z/C (generator changed?)")
        target = "S" if kind == "answer" else "Z"
        deltas = [d for d in range(-9, 10) if d] if target == "S" else [d for d in range(-3, 4) if d]
        edits = [(j, d) for j in range(len(groups[target])) for d in deltas]
        rng.shuffle(edits)
        edits.sort(key=lambda e: -e[0])  # the group's last term first (stable: random delta order within)
        for j, d in edits:
            new = {g: list(v) for g, v in groups.items()}
            new[target][j] += d
            answer = sum(new["S"]) + sum(new["Z"]) * sum(new["C"])
            question = f"{format_group(new['S'])}+{format_group(new['Z'])}*{format_group(new['C'])}="
            yield question, str(answer), f"{target}[{j}] {groups[target][j]} -> {new[target][j]}"
