"""Fine-tuning: LoRA or full-parameter, one task or several mixed, single CPU to multi-GPU.

``rows`` (rows, tokens, labels, collators) -> ``setup`` (precision, model, Trainer arguments, the
log callback) -> ``run`` (the output folder, resume, training, summary). How and why:
docs/engine.md.
"""

from __future__ import annotations

from .rows import (
    KEPT_TARGETS,
    LOGITS_BUCKET,
    LabelledLogitsCollator,
    LabelledLogitsTrainer,
    PaddedCollator,
    PaddingFreeCollator,
    kept_positions,
    labelled_logits_loss,
    make_collator,
    next_token_targets,
    select_rows,
    tokenize_rows,
)
from .run import (
    LOG_FILE,
    REPORT_DIR,
    RUN_CONFIG_FILE,
    SUMMARY_FILE,
    FinetuneResult,
    default_out_dir,
    finetune,
    inspect_output,
    is_finished,
    loss_curve,
    run_identity,
    throughput,
)
from .setup import (
    CHECKPOINT_DIR,
    PACKING_SAFE_ATTENTION,
    Precision,
    TrainLogCallback,
    build_model,
    gradient_accumulation,
    plan_precision,
    training_arguments,
    training_device,
)

__all__ = [
    "CHECKPOINT_DIR",
    "LOG_FILE",
    "REPORT_DIR",
    "PACKING_SAFE_ATTENTION",
    "RUN_CONFIG_FILE",
    "SUMMARY_FILE",
    "FinetuneResult",
    "KEPT_TARGETS",
    "LOGITS_BUCKET",
    "LabelledLogitsCollator",
    "LabelledLogitsTrainer",
    "PaddedCollator",
    "PaddingFreeCollator",
    "Precision",
    "TrainLogCallback",
    "build_model",
    "default_out_dir",
    "finetune",
    "gradient_accumulation",
    "inspect_output",
    "is_finished",
    "kept_positions",
    "labelled_logits_loss",
    "loss_curve",
    "make_collator",
    "next_token_targets",
    "plan_precision",
    "run_identity",
    "select_rows",
    "throughput",
    "tokenize_rows",
    "training_arguments",
    "training_device",
]
