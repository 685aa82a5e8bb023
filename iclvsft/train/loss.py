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

from .rows import next_token_targets


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


def row_means_sum(logits: torch.Tensor, labels: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
    """The sum over rows of each row's mean next-token cross-entropy. ``logits``: at every position
    (batch, length, vocab), or only at the positions whose next token has a label (kept, in order), as
    :class:`~iclvsft.train.rows.LabelledLogitsCollator` asks the model for."""
    targets = next_token_targets(labels)
    labelled = targets != -100
    rows = row_index[labelled].to(logits.device)
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.shape[0] != rows.shape[0]:  # logits at every position: keep the labelled ones
        flat = flat[labelled.reshape(-1).to(logits.device)]
    losses = torch.nn.functional.cross_entropy(flat.float(), targets[labelled].to(logits.device), reduction="none")
    n_rows = int(row_index.max()) + 1
    sums = torch.zeros(n_rows, device=losses.device).index_add(0, rows, losses)
    counts = torch.zeros(n_rows, device=losses.device).index_add(0, rows, torch.ones_like(losses))
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
        rows, labels = inputs.pop("row_index"), inputs.pop("labels")
        outputs = model(**inputs)
        loss = row_means_sum(outputs.logits, labels, rows) / max(getattr(self, "step_rows", 1), 1)
        return (loss, outputs) if return_outputs else loss
