"""The task registry: ``get_task(name, config)`` returns a configured task.

To add a task: write ``iclvsft/tasks/<name>.py`` with a config dataclass and a ``Task`` subclass,
import it here and add it to ``TASKS``. The registry-wide tests in ``tests/test_tasks.py`` then
cover it (determinism, gold answers score 1, splits keep their shortcut invariant).
"""
from __future__ import annotations

from ..errors import ConfigError
from .algebra import AlgebraTask
from .base import DISTRIBUTIONS, POOLS, SPLITS, Draw, Item, Task, TaskConfig, check_distribution
from .boolean import BooleanTask
from .code import CodeTask
from .expression import ExpressionTask
from .formats import FORMAT_FACTORS, FORMATS, PROMPT_STYLES, AuthorsFormat, ChatView, FormattedTask, task_in_format, task_view
from .parity import ParityTask
from .relation import RelationTask

TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (ExpressionTask, CodeTask, BooleanTask, RelationTask, ParityTask, AlgebraTask)
}


def get_task(name: str, config: TaskConfig | dict | None = None) -> Task:
    """The task called ``name``, configured by ``config`` (a dict from YAML, a TaskConfig or None)."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name](config)


def corruption_kinds() -> dict[str, tuple[str, ...]]:
    """Task -> the corruption kinds it defines (``Task.corruptions``), for the tasks that define any."""
    return {name: cls.corruptions for name, cls in TASKS.items() if cls.corruptions}


def parse_task_list(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"expression,code"`` or a list -> validated task names, in the given order, without repeats."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if not names:
        raise ConfigError("no task given; choose from " + ", ".join(TASKS))
    for n in names:
        if n not in TASKS:
            raise ConfigError(f"unknown task {n!r}; choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


__all__ = ["DISTRIBUTIONS", "FORMAT_FACTORS", "FORMATS", "POOLS", "PROMPT_STYLES", "SPLITS", "TASKS", "AuthorsFormat",
           "ChatView", "Draw", "FormattedTask", "Item", "Task", "TaskConfig", "check_distribution", "corruption_kinds",
           "get_task", "parse_task_list", "task_in_format", "task_view"]
