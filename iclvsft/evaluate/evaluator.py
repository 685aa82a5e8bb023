"""Scoring items with a loaded model: one task, one demonstration set (or per-item demonstrations),
batched greedy completions over a shared KV-cached prefix, label log-probabilities for binary tasks."""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from .. import engine
from ..errors import DataError
from ..prompts import build_prompt, prefix, query
from ..scoring import FORMATS, score, substring_match
from ..tasks import Item, Task


def prompt_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Evaluator:
    """Scores items of one task under one demonstration set with a loaded model."""

    def __init__(self, model, tokenizer, batch_size: int, constrained: bool = True):
        self.model, self.tokenizer, self.batch_size, self.constrained = model, tokenizer, batch_size, constrained
        self.fallbacks = 0  # items whose tokenization forced the uncached path
        self._last_prefix: engine.Prefix | None = None

    def cached_prefix(self, text: str) -> engine.Prefix:
        """The KV-cached prefix of ``text``, built once for consecutive calls with the same text: a cell's
        items come in chunks (samples.jsonl grows after each, for resume), all under the same header and
        demonstrations. The prefix's forward pass is the same computation each time and every use copies
        its cache (:meth:`engine.Prefix.expanded`), so reusing it changes no prediction; it saves one pass
        over the header and demonstrations per chunk (~1.9 s at 32 shots on the 0.5B model on 2 cores)."""
        if self._last_prefix is None or self._last_prefix.text != text:
            self._last_prefix = None  # the previous cell's cache is freed before the next is built
            self._last_prefix = engine.build_prefix(self.model, self.tokenizer, text)
        return self._last_prefix

    def run(self, task: Task, items: Sequence[Item], demos: Sequence[Item], max_new_tokens: int,
            use_cache: bool = True) -> list[dict]:
        """Completions and scores for ``items``, all prompted with the same ``demos``."""
        prompts = [build_prompt(task, i.question, demos) for i in items]
        if use_cache:
            pre = self.cached_prefix(prefix(task, demos))
            suffixes = engine.split_suffixes(self.tokenizer, pre, [query(task, i.question) for i in items])
        else:
            pre, suffixes = engine.empty_prefix(), [None] * len(items)
        # Rows whose joint tokenization crosses the prefix boundary (and every row without the
        # cache) take their whole prompt on the uncached path.
        uncached = [n for n, s in enumerate(suffixes) if s is None]
        rows = [s if s is not None else engine.encode(self.tokenizer, p) for s, p in zip(suffixes, prompts)]
        if use_cache:
            self.fallbacks += len(uncached)
        label_ids = self.one_token_labels(task, prompts) if self.constrained else None
        completions, first = self._generate(pre, rows, uncached, max_new_tokens, label_ids)
        if label_ids is not None:  # one-token labels: scored from the generation's own first step
            labels = [dict(zip(FORMATS[task.answer_format].labels, f)) for f in first]
        elif self.constrained:
            labels = self._labels(task, pre, items, prompts, rows, uncached)
        else:
            labels = [None] * len(items)
        return [self._row(task, i, p, c, lab, demos) for i, p, c, lab in zip(items, prompts, completions, labels)]

    def one_token_labels(self, task: Task, prompts: Sequence[str]) -> list[int] | None:
        """The token of each label when, after every prompt, each label (with its separator) is
        exactly one token, always the same one; else None (labels then get a forward pass each)."""
        labels = FORMATS[task.answer_format].labels
        if not labels:
            return None
        found: list[int] | None = None
        for prompt in prompts:
            n = len(engine.encode(self.tokenizer, prompt))
            conts = [engine.encode(self.tokenizer, prompt + task.answer_sep + label)[n:] for label in labels]
            ids = [c[0] for c in conts if len(c) == 1]
            if len(ids) != len(labels) or (found is not None and ids != found):
                return None
            found = ids
        return found

    def run_per_item(self, task: Task, items: Sequence[Item], demos_for: Callable[[Item], list[Item]],
                     max_new_tokens: int) -> list[dict]:
        """Each item with its own demonstrations (no shared prefix to cache)."""
        pre = engine.empty_prefix()
        demo_sets = [demos_for(i) for i in items]
        prompts = [build_prompt(task, i.question, d) for i, d in zip(items, demo_sets)]
        rows = [engine.encode(self.tokenizer, p) for p in prompts]
        completions, _ = self._generate(pre, rows, [], max_new_tokens)
        labels = [None] * len(items)
        if self.constrained and FORMATS[task.answer_format].labels:
            labels = [self._label_scores(task, pre, [items[n]], [rows[n]], [prompts[n]])[0] for n in range(len(items))]
        return [self._row(task, i, p, c, lab, d) for i, p, c, lab, d in zip(items, prompts, completions, labels, demo_sets)]

    def _batches(self, indices: Sequence[int], rows: Sequence[Sequence[int]]) -> list[list[int]]:
        """Batches of similar length (less padding); results go back to item order by index."""
        order = sorted(indices, key=lambda n: (-len(rows[n]), n))
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _generate(self, pre: engine.Prefix, rows, uncached: Sequence[int], max_new_tokens: int,
                  score_tokens: Sequence[int] | None = None) -> tuple[list[str], list[list[float]]]:
        completions: list[str] = [""] * len(rows)
        first: list[list[float]] = [[] for _ in rows]
        cached = [n for n in range(len(rows)) if n not in set(uncached)]
        for group, p in ((cached, pre), (list(uncached), engine.empty_prefix())):
            for batch in self._batches(group, rows):
                ids, scores = engine.decode(self.model, self.tokenizer, p, [rows[n] for n in batch], max_new_tokens,
                                            score_tokens or ())
                for j, n in enumerate(batch):
                    completions[n] = self.tokenizer.decode(ids[j], skip_special_tokens=True)
                    first[n] = scores[j]
        return completions, first

    def _labels(self, task, pre, items, prompts, rows, uncached) -> list[dict | None]:
        if not FORMATS[task.answer_format].labels:
            return [None] * len(items)
        out: list[dict | None] = [None] * len(items)
        cached = [n for n in range(len(items)) if n not in set(uncached)]
        for group, p in ((cached, pre), (list(uncached), engine.empty_prefix())):
            for batch in self._batches(group, rows):
                scores = self._label_scores(task, p, [items[n] for n in batch], [rows[n] for n in batch],
                                            [prompts[n] for n in batch])
                for n, s in zip(batch, scores):
                    out[n] = s
        return out

    def _label_scores(self, task, pre, items, rows, prompts) -> list[dict]:
        """log p(separator + label | prompt) for every label of a binary task."""
        labels = FORMATS[task.answer_format].labels
        seqs, n_scored = [], []
        for row, prompt in zip(rows, prompts):
            prompt_ids = engine.encode(self.tokenizer, prompt)
            for label in labels:
                cont = engine.continuation(prompt_ids, engine.encode(self.tokenizer, prompt + task.answer_sep + label))
                if cont is None:
                    raise DataError(f"{task.name}: the label {label!r} does not tokenize as a continuation of the prompt")
                seqs.append(list(row) + cont)
                n_scored.append(len(cont))
        flat = engine.continuation_logprobs(self.model, self.tokenizer, pre, seqs, n_scored)
        return [dict(zip(labels, flat[i * len(labels):(i + 1) * len(labels)])) for i in range(len(items))]

    @staticmethod
    def _row(task: Task, item: Item, prompt: str, completion: str, label_logprobs: dict | None,
             demos: Sequence[Item] = ()) -> dict:
        """One samples.jsonl row. The prompt is kept as what rebuilds it exactly (``question`` as the
        prompt showed it, ``demo_ids`` in order, the format; :func:`iclvsft.evaluate.samples.rebuild_prompt`)
        plus its hash, not its text: a 16-shot prompt repeated on every row would multiply the file."""
        s = score(item, completion, task.answer_format)
        row = {
            "item_id": item.id, "split": item.split, "format": task.format, "prompt_style": task.prompt_style,
            "question": item.question,
            "demo_ids": [d.id for d in demos], "prompt_sha256": prompt_sha(prompt), "completion": completion,
            "answer": item.answer, "shortcut_answer": item.shortcut_answer,
            "strict": s.strict, "lenient": s.lenient, "correct": s.correct, "lenient_correct": s.lenient_correct,
            "invalid": s.invalid, "shortcut": s.shortcut if item.shortcut_answer is not None else None,
            "constrained": None, "constrained_correct": None, "constrained_shortcut": None, "label_logprobs": None,
            "substring_correct": substring_match(item.answer, completion, task.substring_aliases.get(item.answer, ())),
            "substring_shortcut": substring_match(item.shortcut_answer, completion,
                                                  task.substring_aliases.get(item.shortcut_answer, ())),
        }
        if label_logprobs:
            choice = max(label_logprobs, key=lambda lab: (label_logprobs[lab], lab))
            row.update(constrained=choice, constrained_correct=choice == item.answer,
                       constrained_shortcut=choice == item.shortcut_answer if item.shortcut_answer is not None else None,
                       label_logprobs={k: round(v, 6) for k, v in label_logprobs.items()})
        return row
