"""Task 5, parity (SPEC: "sequences determining answers through parity"; not in the authors' code).

A sequence of 8-16 two- or three-digit integers; is their sum even or odd? The answer is fixed by the
parity of the count of odd numbers, so the sum itself is never needed. That shortcut is always valid,
so a control split is not meaningful: this task emits ``pattern`` only.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Draw, Task, TaskConfig


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
