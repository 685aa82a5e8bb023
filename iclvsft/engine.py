"""Batched greedy decoding and label log-probabilities over a shared, cached prompt prefix.

Why this is written by hand: ``model.generate`` takes one prompt per row and recomputes every row's
full prompt. In an ICL cell every item shares the same header + k demonstrations (up to ~3000
tokens at 32 shots), so we run that prefix through the model **once**, keep its KV cache, and for
each batch copy the cache to the batch size and feed only the items' own tokens::

    [ prefix (cached, shared) ][ pad pad ][ item tokens ] -> greedy tokens ...

Pads sit between the prefix and each item (left padding of the suffixes); they are masked out of
attention, and position ids are the running count of real tokens, so every row computes exactly
what it would alone. The same routine with an empty prefix is the plain (uncached) path; the tests
check both give the same predictions, and that batch size does not change them.

Sliding-window attention (Gemma 2/3, Mistral) counts the pad slots inside its window, so a padded
row would see fewer real tokens than alone once prefix + item + answer outgrow the window: such a
batch is run as groups of rows of equal length, unpadded (:func:`unpadded_groups`).

Tokenization is done on the whole prompt (prefix + question), and the prefix tokens are split off
only when they are a token-for-token prefix of it; otherwise that item falls back to the uncached
path, so caching can never change what the model sees.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class Prefix:
    """A prompt prefix and its KV cache (batch size 1)."""

    text: str
    ids: list[int]
    cache: DynamicCache | None

    @property
    def length(self) -> int:
        return len(self.ids) if self.cache is not None else 0

    def expanded(self, batch: int) -> DynamicCache:
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(batch)
        return cache


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def build_prefix(model, tokenizer, text: str) -> Prefix:
    """Run ``text`` through the model once and keep its KV cache.

    Under ``no_grad`` rather than ``inference_mode``: the circuit analysis runs backward passes on top
    of this cache, which inference tensors would refuse."""
    ids = encode(tokenizer, text)
    if not ids:
        return Prefix(text, ids, None)
    x = torch.tensor([ids], device=device_of(model))
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True, logits_to_keep=1)
    return Prefix(text, ids, out.cache)


def empty_prefix() -> Prefix:
    return Prefix("", [], None)


def continuation(head: Sequence[int], full: Sequence[int]) -> list[int] | None:
    """The tokens of ``full`` after ``head`` when ``full`` starts with exactly ``head`` and goes on;
    None when the joint tokenization crosses the boundary (or adds nothing)."""
    n = len(head)
    return list(full[n:]) if list(full[:n]) == list(head) and len(full) > n else None


def split_suffixes(tokenizer, prefix: Prefix, texts: Sequence[str]) -> list[list[int] | None]:
    """Token ids of each ``prefix.text + text`` after the cached prefix, or None where the joint
    tokenization does not start with the prefix's tokens (that row must go the uncached way)."""
    return [continuation(prefix.ids, encode(tokenizer, prefix.text + text)) for text in texts]


def _batch_inputs(rows: Sequence[Sequence[int]], pad_id: int, prefix_len: int, device) -> tuple:
    """Left-pad ``rows``; the mask and positions cover the cached prefix as well."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), prefix_len + width), dtype=torch.long)
    mask[:, :prefix_len] = 1
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, prefix_len + width - len(r):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix_len:]
    return ids.to(device), mask.to(device), positions.to(device)


def sliding_window(model) -> int | None:
    """The window of a model's sliding-window attention layers, None when it has none."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or getattr(config, "use_sliding_window", True) is False or (
            types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def unpadded_groups(model, prefix: Prefix, rows: Sequence[Sequence[int]], extra: int) -> list[list[int]] | None:
    """Row indices grouped by length when padding after the cached prefix would change what a row sees: a
    sliding window counts the pads, which matters once ``prefix + longest row + extra`` (the tokens
    still to come) reach the window. None when one padded batch is exact. Without a prefix the pads
    lead every row, shifting its slots by a constant: exact."""
    window = sliding_window(model)
    lengths = [len(r) for r in rows]
    if window is None or not prefix.length or len(set(lengths)) == 1 or prefix.length + max(lengths) + extra <= window:
        return None
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    return list(groups.values())


def _finished(text: str, token: int, eos_ids: set[int]) -> bool:
    """A row stops at end of line (once it has written something) or at an end-of-sequence token."""
    return token in eos_ids or "\n" in text.lstrip()


def greedy_ids(model, tokenizer, prefix: Prefix, rows: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy token ids continuing ``prefix + row`` for each row, cut at the end of the first line."""
    return decode(model, tokenizer, prefix, rows, max_new_tokens)[0]


@torch.inference_mode()
def decode(model, tokenizer, prefix: Prefix, rows: Sequence[Sequence[int]], max_new_tokens: int,
           score_tokens: Sequence[int] = ()) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy token ids for each row and, from the same forward pass, the log-probabilities of
    ``score_tokens`` as the first generated token (the constrained score of one-token labels)."""
    if not rows:
        return [], []
    if groups := unpadded_groups(model, prefix, rows, max_new_tokens):
        generated, scores = [[] for _ in rows], [[] for _ in rows]
        for group in groups:
            ids, logp = decode(model, tokenizer, prefix, [rows[i] for i in group], max_new_tokens, score_tokens)
            for j, i in enumerate(group):
                generated[i], scores[i] = ids[j], logp[j]
        return generated, scores
    device = device_of(model)
    ids, mask, positions = _batch_inputs(rows, tokenizer.pad_token_id, prefix.length, device)
    cache = prefix.expanded(len(rows)) if prefix.length else DynamicCache()
    eos_ids = set(_as_list(tokenizer.eos_token_id)) | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    generated: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
    scores: list[list[float]] = [[] for _ in rows]
    if score_tokens:
        logp = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)[:, list(score_tokens)]
        scores = logp.tolist()
    for step in range(max_new_tokens):
        next_tokens = out.logits[:, -1, :].argmax(-1)
        for i, tok in enumerate(next_tokens.tolist()):
            if not done[i]:
                generated[i].append(tok)
                done[i] = _finished(tokenizer.decode(generated[i], skip_special_tokens=True), tok, eos_ids)
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=next_tokens[:, None], attention_mask=mask, position_ids=positions, cache=out.cache,
                    use_cache=True, logits_to_keep=1)
    return generated, scores


@torch.inference_mode()
def continuation_logprobs(model, tokenizer, prefix: Prefix, rows: Sequence[Sequence[int]],
                          n_scored: Sequence[int]) -> list[float]:
    """Sum of log-probabilities of the last ``n_scored[i]`` tokens of each row, given the rest."""
    if not rows:
        return []
    if groups := unpadded_groups(model, prefix, rows, 0):
        out = [0.0] * len(rows)
        for group in groups:
            for i, v in zip(group, continuation_logprobs(model, tokenizer, prefix, [rows[i] for i in group],
                                                         [n_scored[i] for i in group])):
                out[i] = v
        return out
    device = device_of(model)
    ids, mask, positions = _batch_inputs(rows, tokenizer.pad_token_id, prefix.length, device)
    cache = prefix.expanded(len(rows)) if prefix.length else None
    keep = max(n_scored) + 1
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=cache is not None, logits_to_keep=keep)
    logp = torch.log_softmax(out.logits.float(), dim=-1)  # [B, keep, V]; position j predicts token j+1
    scores = []
    for i, n in enumerate(n_scored):
        targets = ids[i, ids.shape[1] - n:]
        preds = logp[i, keep - 1 - n: keep - 1]
        scores.append(float(preds.gather(-1, targets[:, None]).sum()))
    return scores


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [int(x)]
