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
from transformers import DataCollatorWithFlattening, Trainer
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


KEPT_TARGETS = "kept_targets"  # the batch key of the kept positions' targets (LabelledLogitsCollator)
LOGITS_BUCKET = 64  # kept positions per row are padded up to a multiple of this


def kept_positions(labels: torch.Tensor, bucket: int = LOGITS_BUCKET) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, targets)``, both int64 ``(batch, K)``: per row, the positions whose next token has a
    label (in order) and those tokens. K is the most such positions in a row rounded up to a multiple
    of ``bucket // batch`` (at least 1), so the batch's ``batch x K`` slots are a multiple of
    ``bucket`` when ``batch`` divides it: a padding-free batch (one row) keeps a multiple of
    ``bucket`` positions, and a padded batch does not pay ``bucket`` slots per row. A row's remaining
    slots repeat its last kept position (a real token, so its hidden state is finite) with target
    -100, which the cross-entropy ignores (no loss, zero gradient)."""
    targets = next_token_targets(labels)
    keep = targets != -100
    counts = keep.sum(dim=-1).tolist()
    step = max(1, bucket // labels.shape[0])
    width = -(-max(max(counts, default=0), 1) // step) * step
    index = torch.zeros((labels.shape[0], width), dtype=torch.long)
    kept = torch.full((labels.shape[0], width), -100, dtype=torch.long)
    for row, n in enumerate(counts):
        if n:
            positions = keep[row].nonzero().squeeze(-1)
            index[row, :n], kept[row, :n] = positions, targets[row, positions]
            index[row, n:] = positions[-1]
    return index, kept


@dataclass
class LabelledLogitsCollator:
    """Wraps a collator: each batch also carries ``logits_to_keep``, the positions whose next token
    has a label, so the model runs its output layer (151,936 words for Qwen) only there, and
    :data:`KEPT_TARGETS`, their targets (:func:`kept_positions`).

    With the loss on the answer alone, most positions are prompt: skipping them leaves the loss and
    its gradients unchanged (their logits never reach the loss) and saves most of the output layer's
    matmuls and the log-softmax.

    Why an index and not a mask: transformers applies a boolean mask as ``hidden[mask]`` (a
    device-to-host sync and a new output size every step; on an H200 that path stalled 1.2-1.9 s
    steps, benchmarks/README.md), and the loss would need the same selection on the targets. The
    collator runs on the CPU, so it picks the positions and their targets there; transformers gathers
    a 2-D integer ``(batch, K)`` index with ``take_along_dim`` (``slice_logits_to_keep``: per row,
    the same count in every row), which serves padding-free batches (one row) and padded ones
    alike. The kept slots are rounded up to a multiple of ``bucket`` (:func:`kept_positions`) so that
    the output layer's shapes repeat across steps instead of changing every step.

    Train with :class:`LabelledLogitsTrainer` (it keeps :data:`KEPT_TARGETS` out of the forward pass
    and hands them to :func:`labelled_logits_loss`).
    """

    inner: Any
    bucket: int = LOGITS_BUCKET

    def __call__(self, features, *args, **kwargs) -> dict[str, Any]:
        batch = self.inner(features, *args, **kwargs)
        batch["logits_to_keep"], batch[KEPT_TARGETS] = kept_positions(batch["labels"], self.bucket)
        return batch


def labelled_logits_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """The causal-LM loss for logits kept by :class:`LabelledLogitsCollator` (the Trainer's
    ``compute_loss_func``): ``labels`` are the batch's :data:`KEPT_TARGETS` (``(batch, K)``, aligned
    with the kept logits; :class:`LabelledLogitsTrainer` passes them), the cross-entropy is summed
    over them (-100 ignored) and divided by ``num_items_in_batch`` (the label tokens of the whole
    accumulated batch), exactly as transformers' ``ForCausalLMLoss`` does over every position. No
    boolean selection: nothing here waits for the device."""
    logits = outputs.logits
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labelled_logits_loss takes the kept positions' targets {tuple(logits.shape[:-1])}, got "
                         f"labels {tuple(labels.shape)}; train with LabelledLogitsTrainer")
    return fixed_cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).to(logits.device),
                               num_items_in_batch)


class LabelledLogitsTrainer(Trainer):
    """The Trainer for :class:`LabelledLogitsCollator` batches: the kept positions' targets replace
    ``labels`` for the loss (``compute_loss_func``, :func:`labelled_logits_loss`), so that key never
    reaches the model's forward as an unknown keyword. ``num_items_in_batch`` is counted before, from
    the batches' full-length ``labels`` (the Trainer's ``_get_num_items_in_batch``), so it is
    unchanged."""

    def __init__(self, *args, compute_loss_func=labelled_logits_loss, **kwargs):
        super().__init__(*args, compute_loss_func=compute_loss_func, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if KEPT_TARGETS in inputs:
            inputs = {**inputs, "labels": inputs[KEPT_TARGETS]}
            del inputs[KEPT_TARGETS]
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


def make_collator(batching: str, pad_token_id: int, max_length: int, attn_implementation: str | None = None,
                  logits_on: str = "all"):
    """The collator for ``ft.batching`` (docs/engine.md); ``logits_on="labels"`` wraps it in
    :class:`LabelledLogitsCollator` (train with :class:`LabelledLogitsTrainer` and
    :func:`labelled_logits_loss` then)."""
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
