"""``ft.report_to``: the Trainer's logging integrations a run may send its steps to, and whether each
one's package is installed (found, not imported: checked when the config loads)."""
from __future__ import annotations

import importlib.util

# ft.report_to: the Trainer's logging integrations taken here, each with the modules it needs (any one
# of them). Tests check each name is one of transformers' and the presence check agrees with its own.
REPORTERS = {"tensorboard": ("tensorboard", "tensorboardX"), "trackio": ("trackio",), "wandb": ("wandb",),
             "mlflow": ("mlflow",), "comet_ml": ("comet_ml",), "clearml": ("clearml",), "dvclive": ("dvclive",),
             "swanlab": ("swanlab",)}


def reporter_installed(name: str) -> bool:
    """Whether the package ``ft.report_to=<name>`` needs is importable (found, not imported)."""
    return any(importlib.util.find_spec(module) is not None for module in REPORTERS[name])


def report_to_list(value: str | list) -> list[str]:
    """ft.report_to as the Trainer's list: ``none`` -> [], ``tensorboard`` -> [tensorboard], lists as given."""
    names = [value] if isinstance(value, str) else list(value)
    return [n for n in names if n != "none"]
