"""Prompt formats: ``ours`` (each task file's header and question, the default) and ``authors`` (the
formats of the authors' release, for the ladder from their setup to ours, docs/ladder.md).

A format is a *view* of a task: the same items, shown with another header, question text, answer
text and token budget. ``task_in_format(task, "authors")`` returns a task-like object whose
``present(item)`` rewrites an item into that format (same id and split, so samples and overlap checks
work unchanged) and whose header / answer separator / answer format the prompt builder and scorer read
as usual; everything downstream (ICL prompts, FT rows, evaluation, resume, report) runs on it as is.
What each task's authors' format is lives in the task's own file (``AuthorsFormat`` and the
``authors_item`` / ``authors_train_row`` methods).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from .base import Item, Task

FORMATS = ("ours", "authors")
PROMPT_STYLES = ("raw", "chat")


@dataclass(frozen=True)
class AuthorsFormat:
    """The authors' release for one task (their scripts, read in full; docs/authors-data.md).

    header            their evaluation header (a line of its own); the FT rows never had one
    answer_sep        between their query and their answer
    multiline         their queries span several lines (demonstrations then end with a blank line)
    answer_format     how their answers are parsed by strict scoring (``iclvsft.scoring.FORMATS``)
    max_new_tokens    their fixed greedy budget
    substring_aliases gold -> other strings their substring scorer also accepted (relation: 1/0)
    demo_sep          between their demonstrations (expression: `` \n ``); None: a newline, or a blank
                      line when multiline
    """

    header: str
    answer_sep: str
    multiline: bool
    answer_format: str
    max_new_tokens: int
    substring_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    demo_sep: str | None = None


class FormattedTask:
    """A task seen through the authors' format; attributes not set here are the task's own."""

    answer_end = ""  # their rows end with the answer (no newline, no eos)

    def __init__(self, task: Task):
        fmt = task.authors_format
        if fmt is None:
            raise ConfigError(f"task {task.name!r} has no authors' format (their release has expression, relation, "
                              "boolean and algebra); use format=ours or drop the task")
        self._task, self.format = task, "authors"
        self.header, self.answer_sep, self.answer_format = fmt.header, fmt.answer_sep, fmt.answer_format
        self.multiline, self.demo_sep = fmt.multiline, fmt.demo_sep
        self.max_new_tokens, self.substring_aliases = fmt.max_new_tokens, fmt.substring_aliases

    def __getattr__(self, name: str):
        return getattr(self._task, name)

    def present(self, item: Item) -> Item:
        return self._task.authors_item(item)

    def train_row(self, item: Item) -> dict[str, str]:
        """The authors' training text for ``item`` (no header), split before the answer."""
        prompt, completion = self._task.authors_train_row(item)
        return {"prompt": prompt, "completion": completion}


class ChatView:
    """A task (in any format) whose whole prompt, header and demonstrations included, is the user's
    message of ``tokenizer``'s chat template, and whose answer is the assistant's reply. The template
    is rendered once around a marker and split there, so the prompt stays ``prompt_start + header +
    demonstrations`` (one KV-cacheable prefix) ``+ question + prompt_end``."""

    MARK = "\x00iclvsft-user-message\x00"
    prompt_style = "chat"
    answer_sep = ""  # the reply starts the assistant's turn: no separator before the answer

    def __init__(self, task, tokenizer):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ConfigError("prompt_style chat needs a tokenizer with a chat template; this model has none: use "
                              "prompt_style=raw")
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": self.MARK}], tokenize=False,
                                                 add_generation_prompt=True)
        if rendered.count(self.MARK) != 1:
            raise ConfigError("the tokenizer's chat template does not show the user's message verbatim; use "
                              "prompt_style=raw")
        self._task = task
        self.prompt_start, self.prompt_end = rendered.split(self.MARK)

    def __getattr__(self, name: str):
        return getattr(self._task, name)


def task_view(task: Task, fmt: str = "ours", style: str = "raw", tokenizer=None):
    """``task`` in prompt format ``fmt`` and prompt style ``style`` (config keys ``format`` and
    ``prompt_style``; ``chat`` needs the model's tokenizer)."""
    view = task_in_format(task, fmt)
    if style == "raw":
        return view
    if style == "chat":
        return ChatView(view, tokenizer)
    raise ConfigError(f"unknown prompt_style {style!r}; choose from {', '.join(PROMPT_STYLES)}")


def task_in_format(task: Task, fmt: str) -> Task | FormattedTask:
    if fmt == "ours":
        return task
    if fmt == "authors":
        return FormattedTask(task)
    raise ConfigError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
