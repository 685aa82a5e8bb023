"""What an evaluation computes: cells (task x k x demo seed) and, per task, the items, the
demonstration pool and the token budget."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..data import load_items, normalise_question
from ..errors import DataError
from ..prompts import completion_text
from ..tasks import Item, Task, get_task, task_view


@dataclass(frozen=True)
class Cell:
    task: str
    k: int
    demo_seed: int | None  # None for k = 0

    @property
    def key(self) -> str:
        return f"{self.task}/k={self.k}" + (f"/seed={self.demo_seed}" if self.demo_seed is not None else "")


def plan_cells(tasks: Sequence[str], shots: Sequence[int], demo_seeds: Sequence[int]) -> list[Cell]:
    cells = []
    for task in tasks:
        for k in shots:
            if k == 0:
                cells.append(Cell(task, 0, None))
            else:
                cells.extend(Cell(task, k, s) for s in demo_seeds)
    return cells


def cell_keys(tasks: Sequence[str], shots: Sequence[int], demo_seeds: Sequence[int]) -> tuple[str, ...]:
    """The keys of :func:`plan_cells` (how samples.jsonl names a row's cell)."""
    return tuple(c.key for c in plan_cells(tasks, shots, demo_seeds))


def max_new_tokens_for(tokenizer, task: Task, answers: Sequence[str], margin: int = 2) -> int:
    """Enough tokens for the longest known answer plus its separator and end of line."""
    longest = max(len(tokenizer(completion_text(task, a), add_special_tokens=False)["input_ids"]) for a in answers)
    return longest + margin


def _first(items: Sequence[Item], split: str, limit: int) -> list[Item]:
    part = [i for i in items if i.split == split]
    return part[:limit] if limit else part


def select_items(task: Task, test: Sequence[Item], cfg: Config) -> list[Item]:
    """The items a run evaluates for one task: per split in eval.splits, the first eval.limit."""
    ev = cfg.eval
    return [i for split in ev.splits if split in task.splits for i in _first(test, split, ev.limit)]


def items_to_evaluate(data_dir: Path, name: str, cfg: Config) -> list[Item]:
    """:func:`select_items` for task ``name`` from ``data_dir``."""
    task = get_task(name, cfg.data.task_params.get(name))
    return select_items(task, load_items(data_dir, name, "test"), cfg)


@dataclass
class TaskInputs:
    """Everything the cells of one task share."""

    task: Task
    items: list[Item]
    demo_pool: list[Item]
    max_new_tokens: int
    test_questions: set[str]

    def check_demos(self, demos: Sequence[Item], cell: Cell) -> None:
        """Refuse demonstrations that are test questions (the overlap must be 0)."""
        leaked = [d.id for d in demos if normalise_question(d.question) in self.test_questions]
        if leaked:
            raise DataError(f"{cell.key}: demonstrations {leaked[:3]} are test questions; regenerate the data")


def task_inputs(data_dir: Path, name: str, cfg: Config, tokenizer) -> TaskInputs:
    """The task in the config's prompt format, with its items and demonstrations shown in that format."""
    ev = cfg.eval
    task = task_view(get_task(name, cfg.data.task_params.get(name)), cfg.prompt_format, cfg.prompt_style, tokenizer)
    test = [task.present(i) for i in load_items(data_dir, name, "test")]
    train = [task.present(i) for i in load_items(data_dir, name, "train")]
    max_new = (ev.max_new_tokens or task.max_new_tokens
               or max_new_tokens_for(tokenizer, task, [i.answer for i in train]))
    return TaskInputs(task=task, items=select_items(task, test, cfg),
                      demo_pool=[i for i in train if i.split == ev.demo_split], max_new_tokens=max_new,
                      test_questions={normalise_question(i.question) for i in test})
