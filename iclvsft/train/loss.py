"""How the loss of an optimizer step averages its tokens (``ft.loss_average``).

* ``tokens`` (ours, transformers' default since 4.46): cross-entropy summed over every labelled token of
  the step's rows, divided by their count; long rows weigh more.
* ``rows`` (the authors'): each row's mean over its labelled tokens, then the mean over the step's rows.
  Their trainer ran one row per pass and accumulated gradients, with the transformers of the time
  dividing each pass's token mean by the number of passes: every row weighs the same.

transformers has no per-row normalisation, so :class:`RowMeanTrainer` computes it: the collator marks
each position with its row (:class:`RowIndexCollator`), the loss sums the rows' token means
(:func:`row_means_sum`) and divides by the rows of the whole step on this device, counted when the
Trainer gathers the step's batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer

from .rows import KEPT_TARGETS, next_token_targets


@dataclass
class RowIndexCollator:
    """Wraps a collator: each batch also carries ``row_index``, the row each position belongs to (a padded
    batch: its batch index; a padding-free one, rows concatenated: a new row where the positions restart)."""

    inner: Any

    def __call__(self, features, *args, **kwargs) -> dict[str, Any]:
        batch = self.inner(features, *args, **kwargs)
        labels = batch["labels"]
        if "position_ids" in batch and labels.shape[0] == 1:
            batch["row_index"] = torch.cumsum(batch["position_ids"] == 0, dim=-1) - 1
        else:
            batch["row_index"] = torch.arange(labels.shape[0]).unsqueeze(1).expand_as(labels)
        return batch


def row_means_sum(logits: torch.Tensor, labels: torch.Tensor, row_index: torch.Tensor,
                  logits_to_keep: torch.Tensor | None = None, kept_targets: torch.Tensor | None = None) -> torch.Tensor:
    """The sum over rows of each row's mean next-token cross-entropy. ``logits``: at every position
    (batch, length, vocab), or, given ``logits_to_keep`` and ``kept_targets`` (the batch's keys from
    :class:`~iclvsft.train.rows.LabelledLogitsCollator`), only at those positions (batch, K, vocab),
    slots with target -100 ignored."""
    if logits_to_keep is not None:
        rows = torch.take_along_dim(row_index.to(logits.device), logits_to_keep.to(logits.device), dim=-1).reshape(-1)
        targets = kept_targets.to(logits.device).reshape(-1)
        losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets,
                                                   reduction="none")  # 0 where the target is -100
        weights = (targets != -100).to(losses.dtype)
    else:
        targets = next_token_targets(labels)
        labelled = targets != -100
        rows = row_index[labelled].to(logits.device)
        flat = logits.reshape(-1, logits.shape[-1])[labelled.reshape(-1).to(logits.device)]
        losses = torch.nn.functional.cross_entropy(flat.float(), targets[labelled].to(logits.device), reduction="none")
        weights = torch.ones_like(losses)
    n_rows = int(row_index.max()) + 1
    sums = torch.zeros(n_rows, device=losses.device).index_add(0, rows, losses)
    counts = torch.zeros(n_rows, device=losses.device).index_add(0, rows, weights)
    return (sums[counts > 0] / counts[counts > 0]).sum()


class RowMeanTrainer(Trainer):
    """A Trainer whose loss is the mean over the step's rows of each row's token mean (``ft.loss_average:
    rows``). The loss is already normalised for gradient accumulation; under several processes each one
    divides by its own rows and the gradients are averaged across processes."""

    loss_is_scaled_for_ga = True

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        # The step's rows on this device, counted from the same batches the Trainer counts tokens in.
        self.step_rows = sum(int(batch["row_index"].max()) + 1 for batch in batch_samples)
        return super()._get_num_items_in_batch(batch_samples, device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows, labels, kept = inputs.pop("row_index"), inputs.pop("labels"), inputs.pop(KEPT_TARGETS, None)
        outputs = model(**inputs)
        keep = inputs.get("logits_to_keep") if kept is not None else None
        loss = row_means_sum(outputs.logits, labels, rows, keep, kept) / max(getattr(self, "step_rows", 1), 1)
        return (loss, outputs) if return_outputs else loss
