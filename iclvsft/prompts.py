"""The one prompt template per task, used by ICL, fine-tuning and scoring alike.

Layout (``sep`` is "\\n" for one-line questions, "\\n\\n" for multi-line ones)::

    <header>\\n
    <question 1><answer_sep><answer 1><sep>      <- k demonstrations (k may be 0)
    ...
    <query question>                              <- the model continues with <answer_sep><answer>\\n

The answer separator belongs to the completion, never to the prompt: a prompt ending in a space
tokenizes differently from the same text inside a demonstration. An FT row is exactly the zero-shot
prompt plus the completion, so a fine-tuned model is scored with the prompt it was trained on.
"""
from __future__ import annotations

from collections.abc import Sequence

from .errors import ConfigError
from .rng import item_rng
from .tasks import Item, Task


def demo_separator(task: Task) -> str:
    if task.demo_sep is not None:  # the authors' own separators (tasks.formats.AuthorsFormat)
        return task.demo_sep
    return "\n\n" if task.multiline else "\n"


def completion_text(task: Task, answer: str) -> str:
    """What a perfect model generates after the prompt: separator, answer, end of line (the authors'
    format: no end of line, their rows stop at the answer)."""
    return f"{task.answer_sep}{answer}{task.answer_end}"


def demonstration(task: Task, item: Item) -> str:
    """One solved example as it appears in an ICL prompt (without the trailing separator)."""
    return f"{item.question}{task.answer_sep}{item.answer}"


def prefix(task: Task, demos: Sequence[Item] = ()) -> str:
    """Header plus demonstrations: the part of an ICL prompt shared by every query (KV-cacheable)."""
    sep = demo_separator(task)
    return f"{task.prompt_start}{task.header}\n" + "".join(demonstration(task, d) + sep for d in demos)


def query(task: Task, question: str) -> str:
    """What follows the shared prefix: the question (then, in the chat style, the end of the user's turn)."""
    return question + task.prompt_end


def build_prompt(task: Task, question: str, demos: Sequence[Item] = ()) -> str:
    """The full prompt for ``question``: zero-shot when ``demos`` is empty, k-shot ICL otherwise."""
    return prefix(task, demos) + query(task, question)


def ft_row(task: Task, item: Item) -> dict[str, str]:
    """A fine-tuning row: the zero-shot prompt and its completion (loss goes on the completion)."""
    return {"prompt": build_prompt(task, item.question), "completion": completion_text(task, item.answer)}


# --- demonstrations: which train items an ICL prompt shows ------------------------------------------

def demo_order(pool: Sequence[Item], demo_seed: int, task: str, max_k: int) -> list[Item]:
    """The first ``max_k`` rows of a seeded permutation of ``pool``: k-shot takes the first k, so demo
    sets are nested across k (4-shot is a prefix of 16-shot) and shot curves compare like with like."""
    if max_k > len(pool):
        raise ConfigError(f"{task}: {max_k} demonstrations asked for, the train pool has {len(pool)}")
    order = list(range(len(pool)))
    item_rng(demo_seed, "demos", task).shuffle(order)
    return [pool[i] for i in order[:max_k]]


def per_item_demos(pool: Sequence[Item], demo_seed: int, task: str, k: int, item: Item) -> list[Item]:
    """Fresh demonstrations for one item (the authors' protocol: ``eval.demo_mode: per_item``)."""
    rng = item_rng(demo_seed, "demos", task, item.id)
    return [pool[i] for i in rng.sample(range(len(pool)), k)]
