"""Circuit shift: which attention heads and MLPs carry the answer, under base, ICL and fine-tuned
conditions (docs/circuits.md explains the method and choices).

Modules, bottom-up: ``hooks`` (model anatomy, :func:`run_patched`: the one hooked forward pass),
``pairs`` (clean / corrupted pairs; the edits are the tasks' ``corrupt``), ``patching`` (attribution
and activation patching), ``shift`` (distances, bootstrap, agreement; numpy), ``plots`` (heatmaps),
``report`` (the markdown section), ``settings`` (what decides a folder's results) and ``analysis``
(:func:`analyze`: config -> results folder).
The ``circuits`` config section and its checks live in :mod:`iclvsft.config`.
"""

from .analysis import TaskState, adapter_for, analyze, run_condition, summarise_task
from .hooks import Anatomy, Component, ComponentHooks, Trace, anatomy, run_patched, weights_frozen
from .pairs import Pair, PairInputs, PairTokens, corruption_candidates, make_pairs, pair_inputs, tokenize_pair
from .patching import PatchResult, activation_patching, attribution_patching, capture, component_activation, patch_pair
from .plots import plot_map, plot_task
from .report import report_section
from .settings import check_circuit_settings, circuit_settings
from .shift import agreement, bootstrap_shift, cosine_distance, interval95, jsonable, l1_distance, shift, topk_overlap

__all__ = [
    "Anatomy",
    "Component",
    "ComponentHooks",
    "Pair",
    "PairInputs",
    "PairTokens",
    "PatchResult",
    "TaskState",
    "Trace",
    "activation_patching",
    "adapter_for",
    "agreement",
    "analyze",
    "anatomy",
    "attribution_patching",
    "bootstrap_shift",
    "capture",
    "check_circuit_settings",
    "circuit_settings",
    "component_activation",
    "corruption_candidates",
    "cosine_distance",
    "interval95",
    "jsonable",
    "l1_distance",
    "make_pairs",
    "pair_inputs",
    "patch_pair",
    "plot_map",
    "plot_task",
    "report_section",
    "run_condition",
    "run_patched",
    "shift",
    "summarise_task",
    "tokenize_pair",
    "topk_overlap",
    "weights_frozen",
]
