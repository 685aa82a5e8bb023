"""One fine-tuned model of a study or a ladder rung: trained (or resumed, or reused) and then evaluated."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cards import write_model_card
from .config import Config, derive
from .evaluate import EvalPlan, evaluate
from .io import read_json
from .models import release_memory
from .train import finetune, is_finished

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runners:
    """What a study or a ladder calls to train and to evaluate, and whether bars are shown (tests pass
    wrappers that interrupt or watch the real ones)."""

    finetune: Callable[..., Any] = finetune
    evaluate: Callable[..., Any] = evaluate
    show_progress: bool = True


def fit_and_evaluate(config: Config, ft_out: Path, eval_out: Path, data_dir: Path, runners: Runners | None = None) -> None:
    """Fine-tune ``config`` into ``ft_out`` unless it holds that finished run, then evaluate the result
    into ``eval_out`` with ``config``'s eval section (both resume where they stopped)."""
    runners = runners or Runners()
    show_progress = runners.show_progress
    if not is_finished(config, ft_out, data_dir):
        log.info("fine-tuning %s", ft_out)
        runners.finetune(config, ft_out, data_dir, show_progress=show_progress)
        release_memory()  # the trained model's memory, before the evaluation loads it again
    adapter = ft_out if (ft_out / "adapter_config.json").is_file() else None
    model_name = config.model if adapter else str(ft_out)
    metrics = runners.evaluate(EvalPlan(derive(config, {"model": model_name}), data_dir, eval_out, model_name,
                                   str(adapter) if adapter else None), show_progress=show_progress)
    release_memory()
    summary = read_json(ft_out / "summary.json")
    if isinstance(metrics, dict) and summary:  # the model card gains the zero-shot results
        results: dict[str, dict[str, str]] = {}
        for e in metrics.get("by_condition", []):
            if e["k"] == 0 and e.get("accuracy"):
                results.setdefault(e["task"], {})[e["split"]] = f"{100 * e['accuracy']['mean']:.1f}"
        write_model_card(ft_out, config, summary, results)

