"""Prompt formats: ``ours`` (each task file's header and question, the default) and ``authors`` (the
formats of the authors' release, for the ladder from their setup to ours, docs/ladder.md).

A format is a *view* of a task: the same items, shown with another header, question text, answer
text and token budget. ``task_in_format(task, "authors")`` returns a task-like object whose
``present(item)`` rewrites an item into that format (same id and split, so samples and overlap checks
work unchanged) and whose header / answer separator / answer format the prompt builder and scorer read
as usual; everything downstream (ICL prompts, FT rows, evaluation, resume, report) runs on it as is.

The authors' format is a bundle of independent factors (``FORMAT_FACTORS``); config key ``format_ours``
lists those shown our way while the rest stay theirs, so the ladder can change one factor per rung. A
format is named by one string (``format_name``): ``ours``, ``authors``, or e.g.
``authors+ours:budget,labels``; the authors' format with every factor ours *is* ours (tested).
What each task's authors' format is lives in the task's own file (``AuthorsFormat`` and the
``authors_item`` method).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import ConfigError
from .base import Item, Task

FORMATS = ("ours", "authors")
PROMPT_STYLES = ("raw", "chat")
# The factors of the authors' format, each theirs or ours (config key format_ours), in ladder order:
#   budget       their fixed greedy budget (tokens) | the longest train answer + a margin
#   query_space  the query ends with a space and the answer follows it directly (relation ``is ``+``True``,
#                boolean ``is: ``+``1``, algebra ``b = ``+``2``) | no trailing space, the answer starts with one
#   answer_end   the answer ends where the text ends | with a newline
#   labels       their answer words (relation True/False, boolean 1/0) | ours (Yes/No, True/False)
#   header       their evaluation header | ours
#   question     their question text and layout (relation's ``So 'the city A and Z is connected' is``,
#                boolean's ``The result is:``, algebra's ``1a + 4b = 13`` lines, their demonstration
#                separators) | ours
#   giveaway     algebra's query gives a away and asks for b alone | asks for both
FORMAT_FACTORS = ("budget", "query_space", "answer_end", "labels", "header", "question", "giveaway")
# The factors the authors' training text (ft.rows: authors_train) depends on: it has no header, its
# query never ends with a space, it always asks for algebra's whole answer, and a budget is not text.
TRAIN_TEXT_FACTORS = ("answer_end", "labels", "question")
_PREFIX = "authors+ours:"


def format_name(fmt: str, ours: Iterable[str] = ()) -> str:
    """The one string naming a prompt format: ``fmt`` (config key ``format``) with the factors in ``ours``
    (``format_ours``) shown our way; every factor ours is ``ours``."""
    ours = set(ours)
    if unknown := ours - set(FORMAT_FACTORS):
        raise ConfigError(f"unknown format_ours factor(s) {sorted(unknown)}; choose from {', '.join(FORMAT_FACTORS)}")
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "ours" or ours == set(FORMAT_FACTORS):
        return "ours"
    return fmt + (f"+ours:{','.join(f for f in FORMAT_FACTORS if f in ours)}" if ours else "")


def parse_format(name: str) -> frozenset[str] | None:
    """The factors a format name shows our way; None for ``ours`` (the task itself)."""
    if name == "ours":
        return None
    if name == "authors":
        return frozenset()
    if name.startswith(_PREFIX):
        ours = frozenset(name[len(_PREFIX):].split(","))
        if format_name("authors", ours) == name:  # canonical, known factors
            return ours
    raise ConfigError(f"unknown format {name!r}; choose from {', '.join(FORMATS)} (with format_ours: "
                      f"{', '.join(FORMAT_FACTORS)})")


def train_format(name: str, rows: str) -> str:
    """The format name with only the factors FT rows of kind ``rows`` (``ft.rows``) depend on: a run's
    identity, so a rung that changes only how evaluation shows an item reuses the fine-tuned model.
    A factor the rows do not depend on is named as the authors' (as every earlier run was recorded)."""
    ours = parse_format(name)
    ours = set(FORMAT_FACTORS) if ours is None else set(ours)
    relevant = set(TRAIN_TEXT_FACTORS) if rows == "authors_train" else set(FORMAT_FACTORS) - {"budget"}
    if rows != "authors_train" and ours >= relevant:
        return "ours"  # our rows: the budget is not text
    return format_name("authors", ours & relevant)


@dataclass(frozen=True)
class AuthorsFormat:
    """The authors' release for one task (their scripts, read in full; docs/authors-data.md).

    header            their evaluation header (a line of its own); the FT rows never had one
    multiline         their queries span several lines (demonstrations then end with a blank line)
    answer_format     how their answers are parsed by strict scoring (``iclvsft.scoring.FORMATS``)
    answer_factor     the factor that makes their answer text differ from ours (labels, giveaway; None:
                      the same answers), so ``answer_format`` and ``substring_aliases`` follow it
    max_new_tokens    their fixed greedy budget
    query_space       their evaluation query ends with a space, the answer following it directly
    substring_aliases gold -> other strings their substring scorer also accepted (relation: 1/0)
    demo_sep          between their demonstrations (expression: `` \n ``); None: a newline, or a blank
                      line when multiline
    """

    header: str
    multiline: bool
    answer_format: str
    max_new_tokens: int
    answer_factor: str | None = None
    query_space: bool = False
    substring_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    demo_sep: str | None = None


class FormattedTask:
    """A task seen through the authors' format, the factors in ``ours`` shown our way; attributes not
    set here are the task's own."""

    def __init__(self, task: Task, ours: Iterable[str] = ()):
        fmt = task.authors_format
        if fmt is None:
            raise ConfigError(f"task {task.name!r} has no authors' format (their release has expression, relation, "
                              "boolean and algebra); use format=ours or drop the task")
        self._task, self.ours = task, frozenset(ours)
        self.format = format_name("authors", self.ours)
        theirs = {f: f not in self.ours for f in FORMAT_FACTORS}
        self.header = fmt.header if theirs["header"] else task.header
        if theirs["question"]:
            self.multiline, self.demo_sep = fmt.multiline, fmt.demo_sep
        self.trailing_space = fmt.query_space and theirs["query_space"]
        self.answer_sep = "" if self.trailing_space else task.answer_sep
        if fmt.answer_factor and theirs[fmt.answer_factor]:
            self.answer_format, self.substring_aliases = fmt.answer_format, fmt.substring_aliases
        self.answer_end = "" if theirs["answer_end"] else task.answer_end  # their rows end with the answer
        self.max_new_tokens = fmt.max_new_tokens if theirs["budget"] else task.max_new_tokens

    def __getattr__(self, name: str):
        return getattr(self._task, name)

    def present(self, item: Item) -> Item:
        shown = self._task.authors_item(item, self.ours)
        return dataclasses.replace(shown, question=shown.question + " ") if self.trailing_space else shown

    def train_row(self, item: Item) -> dict[str, str]:
        """The authors' training text for ``item`` (no header, no trailing space, algebra's whole answer),
        split before the answer."""
        view = FormattedTask(self._task, self.ours | {"query_space", "giveaway"})
        shown = view.present(item)
        return {"prompt": self._task.authors_train_question(shown.question),
                "completion": f"{view.answer_sep}{shown.answer}{view.answer_end}"}


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
    """``task`` in prompt format ``fmt`` (a ``format_name``: ``Config.prompt_format``) and prompt style
    ``style`` (config key ``prompt_style``; ``chat`` needs the model's tokenizer)."""
    view = task_in_format(task, fmt)
    if style == "raw":
        return view
    if style == "chat":
        return ChatView(view, tokenizer)
    raise ConfigError(f"unknown prompt_style {style!r}; choose from {', '.join(PROMPT_STYLES)}")


def authors_text_view(task: Task, fmt: str) -> FormattedTask:
    """The view whose ``train_row`` is the authors' training text in format ``fmt`` (``ft.rows:
    authors_train``), also when every factor is shown our way (``ours``)."""
    ours = parse_format(fmt)
    return FormattedTask(task, FORMAT_FACTORS if ours is None else ours)


def task_in_format(task: Task, fmt: str) -> Task | FormattedTask:
    ours = parse_format(fmt)
    return task if ours is None else FormattedTask(task, ours)
