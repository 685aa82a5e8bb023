"""Task 5, parity (the paper's "sequences determining answers through parity"; not in the authors' code).

A sequence of 8-16 two- or three-digit integers; is their sum even or odd? The answer is fixed by the
parity of the count of odd numbers, so the sum itself is never needed. That shortcut is always valid,
so a control split is not meaningful: this task emits ``pattern`` only.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import DataError
from .base import Draw, Item, Task, TaskConfig


@dataclass
class ParityConfig(TaskConfig):
    length: tuple[int, int] = (8, 16)
    digits: tuple[int, int] = (2, 3)

    def validate(self) -> None:
        self._check_range("length", lo_min=1, hi_max=64)
        self._check_range("digits", lo_min=1, hi_max=6)


class ParityTask(Task):
    name = "parity"
    config_cls = ParityConfig
    header = "Say whether the sum of each list of numbers is even or odd."
    answer_format = "parity"
    splits = ("pattern",)
    corruptions = ("answer",)

    def generate(self, rng, split: str) -> Draw:
        c = self.config
        numbers = []
        for _ in range(rng.randint(*c.length)):
            d = rng.randint(*c.digits)
            numbers.append(rng.randint(10 ** (d - 1) if d > 1 else 0, 10**d - 1))
        n_odd = sum(n % 2 for n in numbers)
        answer = "odd" if n_odd % 2 else "even"
        question = "The sum of " + ", ".join(map(str, numbers)) + " is"
        return Draw(question=question, answer=answer, shortcut_answer=answer,
                    meta={"numbers": numbers, "n_odd": n_odd})

    def corrupt(self, item: Item, kind: str, rng) -> Iterator[tuple[str, str, str]]:
        """answer: the last digit of one number +-1 (staying within 0..9, so the length is kept)."""
        self.check_corruption(kind)
        numbers = list(item.meta["numbers"])
        if "The sum of " + ", ".join(map(str, numbers)) + " is" != item.question:
            raise DataError(f"{item.id}: the question cannot be rebuilt from meta numbers (generator changed?)")
        edits = [(j, d) for j in range(len(numbers)) for d in (-1, 1) if 0 <= numbers[j] % 10 + d <= 9]
        rng.shuffle(edits)
        for j, d in edits:
            new = list(numbers)
            new[j] += d
            answer = "odd" if sum(n % 2 for n in new) % 2 else "even"
            yield "The sum of " + ", ".join(map(str, new)) + " is", answer, f"number[{j}] {numbers[j]} -> {new[j]}"
