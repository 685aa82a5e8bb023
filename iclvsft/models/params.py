"""Parameter counts, shared by the offline cache's record, ``LoadedModel.info`` and training."""
from __future__ import annotations


def count_parameters(model, trainable_only: bool = False) -> int:
    """The number of elements in ``model.parameters()`` (a tied weight counts once); with
    ``trainable_only`` only the parameters that require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
