"""Clean / corrupted pairs: a test item, a minimal edit of it (the task's ``corrupt``) that changes the
answer's first token, both tokenized to the same length under every condition's prompt."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..engine import Prefix, continuation, empty_prefix, encode
from ..errors import ConfigError
from ..prompts import build_prompt
from ..rng import item_rng
from ..tasks import corruption_kinds


@dataclass(frozen=True)
class Pair:
    """A clean item and its corrupted twin (same length in tokens, different first answer token)."""

    item_id: str
    split: str
    clean_question: str
    clean_answer: str
    corrupt_question: str
    corrupt_answer: str
    edit: str  # what was changed, for people

    def to_dict(self) -> dict[str, str]:
        return dict(self.__dict__)


@dataclass
class PairTokens:
    """A pair tokenized for one condition's prompt: full prompt ids and the two answer tokens."""

    clean_ids: list[int]
    corrupt_ids: list[int]
    clean_token: int
    corrupt_token: int


@dataclass
class PairInputs:
    """What the patching routines take: the shared cached prefix and each run's remaining tokens."""

    prefix: Prefix
    clean_ids: list[int]
    corrupt_ids: list[int]
    clean_token: int
    corrupt_token: int

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """Logit difference clean-answer token minus corrupted-answer token, per batch row."""
        return logits[:, self.clean_token] - logits[:, self.corrupt_token]


def corruption_candidates(task, item, kind: str, seed: int) -> Iterator[tuple[str, str, str]]:
    """Minimal edits of ``item``'s question: ``(question, answer, description)``, in a seeded order
    (``task.corrupt`` with ``item_rng(seed, "circuits", task, item id)``)."""
    kinds = corruption_kinds()
    if kind not in kinds.get(task.name, ()):
        raise ConfigError(f"circuits: no {kind!r} corruption for task {task.name!r}; supported: "
                          + "; ".join(f"{t}: {', '.join(k)}" for t, k in kinds.items()))
    yield from task.corrupt(item, kind, item_rng(seed, "circuits", task.name, item.id))


def tokenize_pair(tokenizer, task, pair: Pair, demos: Sequence) -> PairTokens | str:
    """The pair's token ids under the prompt with ``demos``, or the reason it is unusable."""
    out = []
    for question, answer in ((pair.clean_question, pair.clean_answer), (pair.corrupt_question, pair.corrupt_answer)):
        prompt = build_prompt(task, question, demos)
        ids = encode(tokenizer, prompt)
        cont = continuation(ids, encode(tokenizer, prompt + task.answer_sep + answer))
        if cont is None:
            return "answer is not a continuation of the prompt"
        out.append((ids, cont))
    (clean_ids, clean_cont), (corrupt_ids, corrupt_cont) = out
    if len(clean_ids) != len(corrupt_ids):
        return "different token lengths"
    # The first answer token where the two answers differ. With real tokenizers that is the first
    # token; a byte-level tokenizer keeps a separator space apart, and a task whose answers share a
    # fixed start (algebra: "a = ") differs only after it: that shared part is appended to both.
    j = 0
    while j < min(len(clean_cont), len(corrupt_cont)) and clean_cont[j] == corrupt_cont[j]:
        j += 1
    if j == min(len(clean_cont), len(corrupt_cont)):
        return "same answer tokens"
    shared = tokenizer.decode(clean_cont[:j]).strip()
    if j and shared and not (task.answer_prefix and task.answer_prefix.startswith(shared)):
        return "same first answer token"
    return PairTokens(clean_ids + clean_cont[:j], corrupt_ids + corrupt_cont[:j], clean_cont[j], corrupt_cont[j])


def make_pairs(task, items: Sequence, tokenizer, demo_sets: Sequence[Sequence], n: int, kind: str,
               seed: int) -> tuple[list[Pair], dict[str, int]]:
    """The first ``n`` items (in order) that have a usable corrupted twin under every demo set.

    Returns the pairs and counts of what was skipped: ``items_without_pair`` and, per reason, how many
    candidate edits were rejected.
    """
    pairs: list[Pair] = []
    skipped: dict[str, int] = {"items_without_pair": 0}
    for item in items:
        if len(pairs) >= n:
            break
        for question, answer, edit in corruption_candidates(task, item, kind, seed):
            pair = Pair(item.id, item.split, item.question, item.answer, question, answer, edit)
            if answer == item.answer:
                reason = "same answer"
            else:
                reason = next((r for r in (tokenize_pair(tokenizer, task, pair, d) for d in demo_sets)
                               if isinstance(r, str)), None)
            if reason is None:
                pairs.append(pair)
                break
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            skipped["items_without_pair"] += 1
    return pairs, skipped


def pair_inputs(tokens: PairTokens, prefix: Prefix) -> PairInputs:
    """Split the prompts after the cached prefix when both start with its tokens (else no cache)."""
    p = len(prefix.ids)
    if (prefix.cache is not None and tokens.clean_ids[:p] == prefix.ids == tokens.corrupt_ids[:p]
            and len(tokens.clean_ids) > p):
        return PairInputs(prefix, tokens.clean_ids[p:], tokens.corrupt_ids[p:], tokens.clean_token,
                          tokens.corrupt_token)
    return PairInputs(empty_prefix(), tokens.clean_ids, tokens.corrupt_ids, tokens.clean_token,
                      tokens.corrupt_token)
