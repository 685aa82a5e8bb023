"""Task 4, relation (connectivity).

Cities A..J and Z; lines "X is connected with Y."; the question: are A and Z connected?

* pattern (the authors' data): all lines form one chain through A, and Z appears only when it is on
  that chain. So "Z is mentioned" decides the answer (the shortcut). With ``line_count_cue`` (default,
  as in the authors' data) the number of lines is odd for "Yes" and even for "No", a second cue.
* control: Z always appears, on a separate chain, so the answer is "No" while the shortcut says
  "Yes"; the number of lines carries no cue.

The answer is computed by breadth-first search over the lines (the tests re-derive it with
union-find).

The authors' distribution (``data.distribution: authors``, docs/authors-data.md): ``generate_authors``.
"""
from __future__ import annotations

import dataclasses
import string
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import DataError
from .base import Draw, Item, Task, TaskConfig
from .formats import AuthorsFormat

TARGET = "Z"
AUTHORS_QUERY = "\n\n So 'the city A and Z is connected' is"  # their evaluation query then ends with a space
AUTHORS_CITIES = "BCDEFGHIJ"  # their generator: A..J and Z
AUTHORS_LABEL = {"Yes": "True", "No": "False"}


@dataclass
class RelationConfig(TaskConfig):
    n_cities: int = 10  # cities A, B, ... besides Z
    chain_edges: tuple[int, int] = (2, 9)  # lines of the chain through A
    control_z_edges: tuple[int, int] = (1, 3)  # lines of Z's separate chain on control
    line_count_cue: bool = True

    def validate(self) -> None:
        self._check(isinstance(self.n_cities, int) and 3 <= self.n_cities <= 25,
                    f"n_cities must be in 3..25, got {self.n_cities!r}")
        self._check_range("chain_edges", lo_min=1, hi_max=self.n_cities - 1)
        self._check_range("control_z_edges", lo_min=1, hi_max=self.n_cities - 2)
        self._check(self.chain_edges[0] + 1 + self.control_z_edges[0] <= self.n_cities,
                    "n_cities too small for a chain through A plus a separate chain with Z")
        self._check(isinstance(self.line_count_cue, bool), "line_count_cue must be true or false")
        if self.line_count_cue:
            self._check(self.chain_edges[1] > self.chain_edges[0], "line_count_cue needs chain_edges to span two values")


def connected(lines: list[tuple[str, str]], a: str, b: str) -> bool:
    """Breadth-first search over undirected edges."""
    graph: dict[str, set[str]] = {}
    for x, y in lines:
        graph.setdefault(x, set()).add(y)
        graph.setdefault(y, set()).add(x)
    seen, queue = {a}, deque([a])
    while queue:
        node = queue.popleft()
        if node == b:
            return True
        for nxt in graph.get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return False


def _chain_lines(rng, nodes: list[str]) -> list[tuple[str, str]]:
    """Consecutive nodes linked, each line in a random direction."""
    return [(x, y) if rng.random() < 0.5 else (y, x) for x, y in zip(nodes, nodes[1:])]


class RelationTask(Task):
    name = "relation"
    config_cls = RelationConfig
    header = "Read the connections and say whether A and Z are connected."
    multiline = True
    answer_format = "yesno"
    corruptions = ("answer",)
    authors_format = AuthorsFormat(
        header="Here are some cities expressed as A, B, C, etc. I will show some connection relations, and you need to "
               "tell me if city A and city Z are connected (Answer True or False). Here are some examples: ",
        multiline=True, answer_format="bool", max_new_tokens=2, answer_factor="labels", query_space=True,
        substring_aliases={"True": ("1",), "False": ("0",)}, demo_sep="\n")
    authors_distribution = True

    def authors_item(self, item: Item, ours: frozenset[str] = frozenset()) -> Item:
        """question: lines without the full stop, a blank line, `` So 'the city A and Z is connected' is``
        (the view adds their trailing space); labels: True/False. Their training rows: ``... is True``."""
        question = item.question
        if "question" not in ours:
            question = "\n".join(line.removesuffix(".") for line in question.split("\n")[:-1]) + AUTHORS_QUERY
        if "labels" in ours:
            return dataclasses.replace(item, question=question)
        shortcut = AUTHORS_LABEL[item.shortcut_answer] if item.shortcut_answer is not None else None
        return dataclasses.replace(item, question=question, answer=AUTHORS_LABEL[item.answer], shortcut_answer=shortcut)

    def generate(self, rng, split: str) -> Draw:
        c = self.config
        others = list(string.ascii_uppercase[1:c.n_cities])  # B.. (A is always on the chain)
        rng.shuffle(others)
        if split == "pattern":
            answer_yes = rng.random() < 0.5
            edges = list(range(c.chain_edges[0], c.chain_edges[1] + 1))
            if c.line_count_cue:  # odd number of lines <=> Yes
                edges = [e for e in edges if (e % 2 == 1) == answer_yes]
            n_edges = rng.choice(edges)
            # A chain with n_edges + 1 nodes: A, Z (when Yes) and cities from B..
            members = ["A"] + ([TARGET] if answer_yes else [])
            members += others[: n_edges + 1 - len(members)]
            rng.shuffle(members)
            lines = _chain_lines(rng, members)
            z_members: list[str] = []
        else:
            n_z = rng.randint(*c.control_z_edges)
            max_chain = min(c.chain_edges[1], c.n_cities - 1 - n_z)
            n_edges = rng.randint(c.chain_edges[0], max_chain)
            members = ["A"] + others[:n_edges]
            rng.shuffle(members)
            z_members = [TARGET] + others[n_edges:n_edges + n_z]
            rng.shuffle(z_members)
            lines = _chain_lines(rng, members) + _chain_lines(rng, z_members)
        rng.shuffle(lines)
        answer = "Yes" if connected(lines, "A", TARGET) else "No"
        mentioned = any(TARGET in pair for pair in lines)
        question = "\n".join(f"{x} is connected with {y}." for x, y in lines) + "\nAre A and Z connected?"
        return Draw(question=question, answer=answer, shortcut_answer="Yes" if mentioned else "No",
                    meta={"chain": members, "z_chain": z_members, "n_lines": len(lines)})

    def generate_authors(self, rng, pool: str, split: str) -> Draw:
        """Their ``generate_relation_problem`` (the same in training and evaluation): ``A`` linked to a
        random city X, then one chain through B..J in shuffled order (9 lines); ``X - Z`` appended iff
        the answer is Yes (10 lines). Their "need_false" (control) drops the chain's last line and never
        adds Z, so the answer is No and the shortcut ("Z is mentioned") still holds."""
        cities = list(AUTHORS_CITIES)
        rng.shuffle(cities)
        x = rng.choice(cities)
        lines = [("A", x)] + list(zip(cities, cities[1:]))
        if split == "control":
            lines.pop()
        elif rng.random() < 0.5:
            lines.append((x, TARGET))
        answer = "Yes" if connected(lines, "A", TARGET) else "No"
        mentioned = any(TARGET in pair for pair in lines)
        question = "\n".join(f"{a} is connected with {b}." for a, b in lines) + "\nAre A and Z connected?"
        return Draw(question=question, answer=answer, shortcut_answer="Yes" if mentioned else "No",
                    meta={"chain": cities, "a_link": x, "n_lines": len(lines)})

    def corrupt(self, item: Item, kind: str, rng) -> Iterator[tuple[str, str, str]]:
        """answer: Z renamed to an unused city, or a city renamed to Z, or (control items, where Z sits on
        its own chain) one city renamed to another so the two chains join; never "B is connected with B"."""
        self.check_corruption(kind)
        *line_texts, last = item.question.split("\n")
        lines = []
        for text in line_texts:
            words = text.removesuffix(".").split(" is connected with ")
            if len(words) != 2:
                raise DataError(f"{item.id}: cannot parse relation line {text!r}")
            lines.append((words[0], words[1]))
        cities = {c for pair in lines for c in pair}
        unused = [c for c in string.ascii_uppercase if c not in cities and c not in ("A", TARGET)]
        others = sorted(c for c in cities if c not in ("A", TARGET))
        rng.shuffle(unused)
        rng.shuffle(others)
        if TARGET in cities:  # Z renamed away; then (control: Z on its own chain) one city renamed to another
            renames = [(TARGET, c) for c in unused] + [(x, y) for x in others for y in others if x != y]
        else:  # a city renamed to Z
            renames = [(c, TARGET) for c in others]
        for old, new in renames:
            new_lines = [tuple(new if c == old else c for c in pair) for pair in lines]
            if any(x == y for x, y in new_lines):  # no "B is connected with B."
                continue
            question = "\n".join(f"{x} is connected with {y}." for x, y in new_lines) + "\n" + last
            yield question, "Yes" if connected(new_lines, "A", TARGET) else "No", f"city {old} -> {new}"
