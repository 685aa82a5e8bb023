"""What every task shares: the item record, the config base class and the task base class.

A task (reasoning-gym style) is one file with a config dataclass (with ``validate()``) and a
``Task`` subclass whose ``generate(rng, split)`` draws one question for a split from a private RNG.
``make_item`` turns that into an :class:`Item` with a stable id and the seed/index in ``meta``.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import ConfigError, DataError
from ..rng import item_rng

SPLITS = ("pattern", "control")
POOLS = ("train", "test")
DISTRIBUTIONS = ("ours", "authors")  # config key data.distribution (docs/authors-data.md)


@dataclass(frozen=True)
class Item:
    """One question with its gold answer (docs/data.md).

    ``shortcut_answer`` is what the task's shortcut predicts; equal to ``answer`` on ``pattern``,
    different on ``control``. It is ``None`` where the shortcut yields no answer (see algebra).
    """

    id: str
    task: str
    split: str
    question: str
    answer: str
    shortcut_answer: str | None
    meta: dict[str, Any] = field(default_factory=dict)

    FIELDS: ClassVar[tuple[str, ...]] = ("id", "task", "split", "question", "answer", "shortcut_answer", "meta")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.FIELDS}

    def to_row(self) -> dict[str, Any]:
        """The item as a line of train.jsonl / test.jsonl: ``meta`` as a JSON string (sorted keys), so
        every task's rows share one schema of plain string columns and ``datasets.load_dataset`` reads
        all tasks at once (meta's fields differ per task)."""
        return {**self.to_dict(), "meta": json.dumps(self.meta, sort_keys=True, separators=(",", ":"))}

    @classmethod
    def from_dict(cls, row: Any, where: str = "row") -> Item:
        """Build an item from a decoded JSON row, with a clear error for a corrupt one."""
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}; "
                            "regenerate the data with generate_data.py")
        missing = [k for k in cls.FIELDS if k not in row]
        extra = [k for k in row if k not in cls.FIELDS]
        if missing or extra:
            raise DataError(f"{where}: missing fields {missing} / unknown fields {extra}; "
                            "regenerate the data with generate_data.py")
        for k in ("id", "task", "split", "question", "answer"):
            if not isinstance(row[k], str) or not row[k]:
                raise DataError(f"{where}: field {k!r} must be a non-empty string; regenerate the data with generate_data.py")
        if row["split"] not in SPLITS:
            raise DataError(f"{where}: split {row['split']!r} is not one of {SPLITS}")
        if row["shortcut_answer"] is not None and not isinstance(row["shortcut_answer"], str):
            raise DataError(f"{where}: shortcut_answer must be a string or null")
        meta = row["meta"]
        if isinstance(meta, str):  # the file form (to_row)
            try:
                meta = json.loads(meta)
            except ValueError:
                meta = None
        if not isinstance(meta, dict):
            raise DataError(f"{where}: meta must be a JSON object (or a string holding one)")
        return cls(**{**{k: row[k] for k in cls.FIELDS}, "meta": meta})


@dataclass
class TaskConfig:
    """Base for per-task configs. Subclasses are dataclasses with defaults and a ``validate()``."""

    def validate(self) -> None:  # pragma: no cover - overridden
        pass

    def _check(self, ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"{type(self).__name__}: {message}")

    def _check_range(self, name: str, lo_min: int | None = None, hi_max: int | None = None) -> None:
        value = getattr(self, name)
        self._check(isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value),
                    f"{name} must be a pair of integers [lo, hi], got {value!r}")
        lo, hi = value
        self._check(lo <= hi, f"{name} must have lo <= hi, got {value!r}")
        if lo_min is not None:
            self._check(lo >= lo_min, f"{name} must start at {lo_min} or above, got {value!r}")
        if hi_max is not None:
            self._check(hi <= hi_max, f"{name} must end at {hi_max} or below, got {value!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, where: str = "config") -> TaskConfig:
        values = dict(values or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(names)}")
        for key, value in values.items():  # YAML gives lists where defaults are tuples
            if isinstance(value, list):
                values[key] = tuple(value)
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Draw:
    """What ``Task.generate`` returns for one item."""

    question: str
    answer: str
    shortcut_answer: str | None
    meta: dict[str, Any]


class Task:
    """Base class of the six tasks. Subclasses set the class attributes and implement ``generate``.

    Class attributes:
      name           registry key, also the folder name under data/.
      config_cls     the task's TaskConfig subclass.
      header         first line of every prompt of this task (ICL, FT and zero-shot alike).
      answer_sep     text between the question and the answer on a demonstration line; it belongs
                     to the completion (a trailing space in a prompt tokenizes badly).
      multiline      questions span several lines, so demonstrations are separated by a blank line.
      answer_format  name of the scoring format in ``iclvsft.scoring.FORMATS``.
      splits         the splits this task emits.
      corruptions    the kinds of minimal edit ``corrupt`` makes (circuit analysis: the corrupted twin
                     of a clean item); empty = none. ``answer``: edit what the answer is read from;
                     ``control``: edit what turns a pattern item into its control twin.
      answer_prefix  text every answer starts with (algebra: ``a = ``); the circuit analysis reads the
                     answer where two answers first differ, after this shared prefix.
      authors_format the authors' release format of this task (``iclvsft.tasks.formats``), with the
                     methods ``authors_item`` and ``authors_train_question``; None where they had none.
      authors_distribution  the task implements ``generate_authors``: the numbers and structures the
                     authors' generators draw (``data.distribution: authors``, docs/authors-data.md).

    A task object is also the ``ours`` view of itself (``present`` is the identity); the ``authors``
    view (:class:`iclvsft.tasks.formats.FormattedTask`) overrides the attributes below.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[TaskConfig]]
    header: ClassVar[str]
    answer_sep: ClassVar[str] = " "
    multiline: ClassVar[bool] = False
    answer_format: ClassVar[str]
    splits: ClassVar[tuple[str, ...]] = SPLITS
    corruptions: ClassVar[tuple[str, ...]] = ()
    answer_prefix: ClassVar[str] = ""
    authors_format: ClassVar[Any] = None  # an AuthorsFormat (formats.py imports this module)
    authors_distribution: ClassVar[bool] = False

    # The format-dependent attributes of the default (``ours``) format.
    format: ClassVar[str] = "ours"
    answer_end: ClassVar[str] = "\n"  # a completion ends with a newline (then eos when ft.append_eos)
    max_new_tokens: ClassVar[int] = 0  # 0: the longest train answer + a margin (evaluate.cells)
    prompt_style: ClassVar[str] = "raw"  # raw text; ``chat``: inside the tokenizer's chat template (formats.ChatView)
    prompt_start: ClassVar[str] = ""  # text before the header (chat: the template up to the user's message)
    prompt_end: ClassVar[str] = ""  # text after the query (chat: the end of the user's turn, the assistant's start)
    demo_sep: ClassVar[str | None] = None  # between demonstrations; None: a newline (a blank line when multiline)
    substring_aliases: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, config: TaskConfig | dict | None = None):
        if config is None:
            config = self.config_cls()
        elif isinstance(config, dict):
            config = self.config_cls.from_dict(config, where=f"tasks.{self.name}")
        config.validate()
        self.config = config

    def generate(self, rng, split: str) -> Draw:  # pragma: no cover - abstract
        raise NotImplementedError

    def generate_authors(self, rng, pool: str, split: str) -> Draw:
        """One item drawn as the authors' generators draw it: ``pool`` train = their training file's
        distribution, test = their evaluation-time generator; ``split`` control = their "need_false"
        items. The question keeps this task's own surface form (the ``authors`` format rewrites it)."""
        raise NotImplementedError

    def present(self, item: Item) -> Item:
        """``item`` as this format shows it (``ours``: unchanged)."""
        return item

    def authors_item(self, item: Item, ours: frozenset[str] = frozenset()) -> Item:
        """``item`` in the authors' evaluation format, the factors in ``ours`` (``formats.FORMAT_FACTORS``)
        shown our way: their query text (without its trailing space: the view adds it), gold and shortcut
        strings."""
        raise NotImplementedError

    def authors_train_question(self, question: str) -> str:
        """Their training text's query, from their evaluation query as the view shows it (the same here)."""
        return question

    def verify(self, items: list[Item]) -> list[str]:
        """Ids of items whose answer an independent route disagrees with (the code task runs its
        programs in a sandbox); tasks whose generator already is the only cheap route return []."""
        return []

    def check_corruption(self, kind: str) -> None:
        if kind not in self.corruptions:
            raise ConfigError(f"task {self.name!r} has no {kind!r} corruption; it has: "
                              f"{', '.join(self.corruptions) or 'none'}")

    def corrupt(self, item: Item, kind: str, rng) -> Iterator[tuple[str, str, str]]:
        """Minimal edits of ``item``'s question, each ``(question, answer, description)`` with the answer
        recomputed from the edited question, in an order drawn from ``rng`` (a ``random.Random``).
        ``kind``: one of :attr:`corruptions`. Tasks without corruptions raise ConfigError."""
        self.check_corruption(kind)
        raise NotImplementedError(f"{type(self).__name__} lists corruptions but does not implement corrupt()")

    def make_item(self, seed: int, pool: str, split: str, index: int, distribution: str = "ours") -> Item:
        if split not in self.splits:
            raise ConfigError(f"task {self.name!r} has no split {split!r}; it emits {self.splits}")
        check_distribution(self, distribution)
        if distribution == "authors":  # a stream of its own: the default data's items never move
            rng = item_rng(seed, "authors", self.name, pool, split, index)
            draw = self.generate_authors(rng, pool, split)
            meta = {"seed": seed, "pool": pool, "index": index, "distribution": "authors", **draw.meta}
        else:
            rng = item_rng(seed, self.name, pool, split, index)
            draw = self.generate(rng, split)
            meta = {"seed": seed, "pool": pool, "index": index, **draw.meta}
        return Item(id=f"{self.name}-{pool}-{split}-{index:05d}", task=self.name, split=split,
                    question=draw.question, answer=draw.answer, shortcut_answer=draw.shortcut_answer, meta=meta)


def check_distribution(task: Task, distribution: str) -> None:
    """One line for an unknown distribution or a task the authors' distribution does not cover."""
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"unknown data.distribution {distribution!r}; choose from {', '.join(DISTRIBUTIONS)}")
    if distribution == "authors" and not task.authors_distribution:
        raise ConfigError(f"task {task.name!r} has no authors' distribution (their release has expression, relation, "
                          "boolean and algebra); use data.distribution=ours or drop the task")
