"""Fine-tuning rows: the first N pattern items of each task as prompt/completion, their tokens and
labels (prompt tokens masked unless ``loss_on: sequence``), and the batch collators."""
from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorWithFlattening
from transformers.loss.loss_utils import fixed_cross_entropy

from ..config import BATCHING, LOSS_ON
from ..data import load_items, load_manifest
from ..errors import ConfigError, DataError
from ..prompts import ft_row
from ..tasks import get_task, parse_task_list, task_view
from ..tasks.formats import authors_text_view

logger = logging.getLogger(__name__)


def select_rows(data_dir: str | Path, tasks: Sequence[str], n_train: int, seed: int = 0,
                task_params: dict | None = None, fmt: str = "ours", row_text: str = "prompt", style: str = "raw",
                tokenizer=None) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The first ``n_train`` pattern rows of each task as ``{id, task, prompt, completion}``.

    ``fmt`` is the prompt format (``ours`` | ``authors``); ``row_text`` (``ft.rows``) is ``prompt``
    (a row is the zero-shot evaluation prompt plus its completion) or ``authors_train`` (the authors'
    training text, which is not their evaluation prompt: no header, expression's ``+=``); ``style``
    (``prompt_style``) ``chat`` wraps each row's prompt in ``tokenizer``'s chat template.

    One task keeps file order (the Trainer shuffles each epoch); several are concatenated and
    shuffled with ``seed``. Also returns a record of where the rows came from (per task: the train
    file's sha256 from the manifest, first and last id; a sha256 over all row ids in order).
    """
    tasks = parse_task_list(list(tasks))
    manifest = load_manifest(data_dir)
    rows: list[dict[str, str]] = []
    record: dict[str, Any] = {"tasks": {}}
    for name in tasks:
        base = get_task(name, (task_params or {}).get(name))
        task = task_view(base, fmt, style, tokenizer)
        items = load_items(data_dir, name, "train", split="pattern")
        if len(items) < n_train:
            raise DataError(f"{name}: {Path(data_dir) / name / 'train.jsonl'} holds {len(items)} pattern rows, "
                            f"ft.n_train asks for {n_train}; lower --n-train or regenerate the data with "
                            f"data.train_pattern >= {n_train}")
        chosen = items[:n_train]
        make = (authors_text_view(base, fmt).train_row if row_text == "authors_train"
                else (lambda item, task=task: ft_row(task, task.present(item))))
        rows += [{"id": item.id, "task": name, **make(item)} for item in chosen]
        record["tasks"][name] = {"rows": n_train, "first_id": chosen[0].id, "last_id": chosen[-1].id,
                                 "train_sha256": manifest["tasks"][name]["files"]["train"].get("sha256")}
    if len(tasks) > 1:
        random.Random(seed).shuffle(rows)
    record["rows"] = len(rows)
    record["ids_sha256"] = hashlib.sha256("\n".join(r["id"] for r in rows).encode()).hexdigest()
    return rows, record


def tokenize_rows(rows: Sequence[dict[str, str]], tokenizer, *, loss_on: str = "completion", max_length: int = 512,
                  append_eos: bool = True) -> tuple[list[dict[str, list[int]]], dict[str, Any]]:
    """``input_ids`` and ``labels`` per row, plus token statistics.

    ``input_ids = tokenize(prompt) + tokenize(completion) [+ eos]``: the prompt exactly as evaluation
    encodes it (special tokens included), the completion without special tokens. ``labels`` copy the
    ids where the loss applies and hold -100 elsewhere. A row longer than ``max_length`` is cut at the
    end; one that keeps no label token (the label of the first token is never a prediction target)
    raises :class:`DataError` naming the row.
    """
    if loss_on not in LOSS_ON:
        raise ConfigError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
    eos = [tokenizer.eos_token_id] if append_eos else []
    if append_eos and tokenizer.eos_token_id is None:
        raise ConfigError("ft.append_eos is true but the tokenizer has no eos token; set ft.append_eos=false")
    features, truncated, label_tokens, tokens = [], [], 0, 0
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + eos
        input_ids = prompt + completion
        labels = list(input_ids) if loss_on == "sequence" else [-100] * len(prompt) + completion
        if len(input_ids) > max_length:
            truncated.append(row["id"])
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        n_labels = sum(label != -100 for label in labels[1:])
        if n_labels == 0:
            raise DataError(f"row {row['id']}: prompt {len(prompt)} tokens + completion {len(completion)} tokens, "
                            f"cut to ft.max_length={max_length}, leaves no token to train on; raise ft.max_length "
                            f"(or use ft.loss_on=sequence)")
        label_tokens += n_labels
        tokens += len(input_ids)
        features.append({"input_ids": input_ids, "labels": labels})
    if truncated:
        logger.warning("%d of %d rows are longer than ft.max_length=%d and were cut at the end (e.g. %s)",
                       len(truncated), len(rows), max_length, ", ".join(truncated[:3]))
    lengths = [len(f["input_ids"]) for f in features]
    stats = {"rows": len(features), "tokens": tokens, "label_tokens": label_tokens, "truncated_rows": len(truncated),
             "max_row_tokens": max(lengths, default=0), "mean_row_tokens": round(tokens / max(len(features), 1), 2)}
    return features, stats


@dataclass
class PaddedCollator:
    """Right-pads a batch to its longest row (``pad_to=None``) or to ``pad_to`` tokens.

    Hand-rolled because transformers' collators pad on the tokenizer's side, and ours pads left for
    batched generation; training needs right padding so every real token keeps the position it has
    in an unpadded row (left padding would shift positions unless position ids were passed).
    """

    pad_token_id: int
    pad_to: int | None = None

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        longest = max(len(f["input_ids"]) for f in features)
        length = max(self.pad_to or 0, longest)
        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(features), length), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class PaddingFreeCollator(DataCollatorWithFlattening):
    """``DataCollatorWithFlattening`` whose batches also carry ``use_cache=False``.

    transformers builds the block-diagonal mask from restarting position ids only when the forward
    pass has no KV cache; a model whose config says ``use_cache=True`` (every model as loaded for
    generation) would silently create one and let rows attend to each other. The Trainer turns the
    cache off, but the batch itself should be correct in any forward.
    """

    def __call__(self, features, return_tensors=None, separator_id=None):
        return {**super().__call__(features, return_tensors, separator_id), "use_cache": False}


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts: ``labels`` shifted left by one, -100 after the last token
    (how transformers' causal-LM loss pairs logits with labels)."""
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=-100)


@dataclass
class LabelledLogitsCollator:
    """Wraps a collator: each batch also carries ``logits_to_keep``, the mask of positions whose next
    token has a label, so the model runs its output layer (151,936 words for Qwen) only there.

    With the loss on the answer alone, most positions are prompt: skipping them leaves the loss and
    its gradients unchanged (their logits never reach the loss) and saves most of the output layer's
    matmuls and the log-softmax. transformers accepts such a mask (``slice_logits_to_keep``) but its
    loss then misaligns the full-length labels, so :func:`labelled_logits_loss` pairs the kept logits
    with their targets (hand-written because no library loss takes pre-selected positions).
    """

    inner: Any

    def __call__(self, features, *args, **kwargs) -> dict[str, Any]:
        batch = self.inner(features, *args, **kwargs)
        batch["logits_to_keep"] = next_token_targets(batch["labels"]) != -100
        return batch


def labelled_logits_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """The causal-LM loss for logits kept by :class:`LabelledLogitsCollator` (the Trainer's
    ``compute_loss_func``): cross-entropy summed over the labelled positions and divided by
    ``num_items_in_batch`` (the label tokens of the whole accumulated batch), exactly as transformers'
    ``ForCausalLMLoss`` does over every position."""
    targets = next_token_targets(labels)
    targets = targets[targets != -100].to(outputs.logits.device)
    return fixed_cross_entropy(outputs.logits.float(), targets, num_items_in_batch)


def make_collator(batching: str, pad_token_id: int, max_length: int, attn_implementation: str | None = None,
                  logits_on: str = "all"):
    """The collator for ``ft.batching`` (docs/engine.md); ``logits_on="labels"`` wraps it in
    :class:`LabelledLogitsCollator` (train with :func:`labelled_logits_loss` then)."""
    if batching == "padding_free":
        flash = bool(attn_implementation and attn_implementation.startswith("flash_attention"))
        collator = PaddingFreeCollator(return_position_ids=True, separator_id=-100, return_flash_attn_kwargs=flash)
    elif batching == "padded":
        collator = PaddedCollator(pad_token_id)
    elif batching == "max_length":
        collator = PaddedCollator(pad_token_id, pad_to=max_length)
    else:
        raise ConfigError(f"ft.batching must be one of {', '.join(BATCHING)}, got {batching!r}")
    return LabelledLogitsCollator(collator) if logits_on == "labels" else collator
