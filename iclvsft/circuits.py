"""Circuit shift: which attention heads and MLPs carry the answer, under base, ICL and fine-tuned conditions.

SPEC "The experiment" (circuit shift), issue 6. The paper's claim to test: in-context learning moves the
answer onto different components ("shifts the circuit") more than fine-tuning does.

Components
    Every query head of every layer and every MLP block: a grid of ``n_layers x (n_heads + 1)``, the last
    column being the MLP. A head's output is its slice of the input of ``self_attn.o_proj`` (reshaped to
    ``(heads, head_dim)``), read and replaced by a forward pre-hook on ``o_proj``; with grouped-query
    attention these are the ``num_attention_heads`` query heads (several share one key/value head), which
    is what ``o_proj`` sees. An MLP's output is the output of the layer's ``mlp`` module (forward hook).
    Plain PyTorch hooks on the Hugging Face modules, so any Qwen2/Llama/Mistral-style decoder works
    (:func:`anatomy` finds the decoder layers; a PEFT-wrapped ``o_proj`` is hooked the same way).

Clean / corrupted pairs
    Clean = a test item (``circuits.split``, pattern by default). Corrupted = a *minimal edit* of its
    question that changes the gold answer's first token, with the answer recomputed from the edited
    question. ``circuits.corruption``:

    * ``answer`` (default): edit the part the answer is read from. expression: one term of S (so
      sum(S) changes); boolean: the final clause's constant or operator; relation: Z renamed to an
      unused city, or a city renamed to Z, or (control items, where Z sits on its own chain) one city
      renamed to another so the two chains join; parity: the last digit of one number +-1.
    * ``control`` (expression only): edit one term of Z, so a pattern item becomes its control twin
      (Z no longer sums to 0, the answer becomes S + Z*C) and a control item its pattern twin (Z sums
      to 0: the contrast token is then the item's shortcut answer).

    Candidate edits are tried in an order drawn from ``item_rng(circuits.seed, "circuits", task, id)``;
    the first one is kept for which, in every condition's prompt (zero-shot and k-shot), clean and
    corrupted prompts have **the same number of tokens** (so every position aligns and components are
    patched at every position), both answers tokenize as a continuation of their prompt (the way
    ``evaluate.Evaluator._label_scores`` checks labels; e.g. Qwen merges ``)=`` with a leading minus into
    ``=-``, so a negative answer is not a continuation and such an edit is skipped), and the two
    answers' first tokens differ. Items without such an edit are skipped (counted in ``circuits.json``);
    the first ``n_items`` items that have one are used, the same pairs in every condition (so the
    bootstrap over items is paired). boolean needs a tokenizer where `` True`` and `` False`` have the
    same length (Qwen: one token each; not the byte-level test tokenizer). code and algebra have no
    corruption yet (algebra's answers all start with ``a = ``; an edit of a program's input changes
    the answer only through the program, and its length often).

Metric
    Logit difference at the answer position (the last prompt token), between the clean gold answer's
    first token and the corrupted answer's first token: ``m = logit[clean] - logit[corrupt]``. It is
    computed on the clean run (``m_clean``, > 0 when the model prefers its gold answer) and on the
    corrupted run (``m_corrupt``). (Where a tokenizer keeps the answer separator apart, e.g. the
    byte-level test tokenizer's space before ``Yes``, that shared whitespace token is appended to both
    prompts and the metric is read one position later, at the first token where the answers differ.)
    Precision: fp32 by default (``circuits.dtype``): in bf16, logits around 20 are 0.125 apart, coarser
    than many single-component effects (seen on the 0.5B model: exact patching effects quantised to
    0.125 steps).

Activation patching (exact, "denoising")
    Run the corrupted prompt with one component's output replaced, at every position, by its output on
    the clean prompt; the component's effect is ``m_patched - m_corrupt`` (in logits; divided by
    ``m_clean - m_corrupt`` it is the fraction of the clean behaviour it recovers). One forward pass per
    component, batched (``circuits.batch_size`` patched copies per pass).

Attribution patching (fast, first-order)
    ``effect ~= sum over positions and dims of (a_clean - a_corrupt) * dm/da`` with the gradient taken
    on the corrupted run: one forward pass over clean and corrupted prompts as a batch of two, and one
    backward pass, per pair, for every component at once. Gradients are taken by adding a zero tensor that requires grad to each hooked
    activation (the graph is not cut, so each gradient is the component's total effect through all later
    layers); the weights' gradients are not computed. How good the approximation is can be checked in
    every run (``circuits.activation_items``: the first N pairs also get exact patching; circuits.json
    reports the agreement). On Qwen2.5-Coder-0.5B / expression (3 pairs per condition, fp32) the
    Spearman correlation over all pair x component effects was 0.95-0.97; the known weak spot is the
    layer-0 MLP, whose effect attribution underestimates (one pair: 0.30 vs 1.10 exact).

Shared prefix
    Clean and corrupted prompts share the header and the k demonstrations, whose activations are
    identical in both runs. That prefix is run once per condition and its KV cache reused, so only the
    item's own tokens are recomputed (and patched: patching the identical prefix would change nothing).
    The cache is built under ``torch.no_grad`` (not ``inference_mode``, whose tensors cannot be saved
    for the backward pass) and copied for each run.

Conditions
    ``base`` (base model, zero-shot), ``icl`` (base model with ``circuits.shots`` demonstrations, the same
    demo set for every item: :func:`iclvsft.evaluate.demo_order` with ``circuits.demo_seed``, the demo
    sets the ICL evaluation uses), ``ft`` (base model + the task's adapter, merged, zero-shot).

Shift
    The condition map is the mean over items of the per-item attribution maps (logit units; signed:
    positive pushes towards the clean answer). For ICL and FT, the distance from the base map:
    ``1 - cosine``; the normalised L1 distance ``0.5 * || a/|a|_1 - b/|b|_1 ||_1`` (0 = same relative
    importance everywhere, 1 = no overlap); the top-k overlap (share of the k components with the
    largest |effect| that both maps have in their top k; a similarity, 1 = same top k). Overall, and per
    layer (cosine and L1 over the layer's heads + MLP). 95% intervals: percentile bootstrap over items
    (the same resampled items in every condition), seeded ``numpy.random.default_rng(circuits.seed)``.
    Also reported: ICL shift minus FT shift with its paired interval, and a reference: the distance
    between base maps of two disjoint random halves of the items (how far maps move from item sampling
    alone).

Outputs (:func:`analyze`): ``config.json`` (resolved config, provenance, command line), ``scores.jsonl``
(one row per task x condition x pair: the pair, metrics and both maps), ``circuits.json`` (maps, shift
metrics, intervals, the attribution-vs-activation agreement where both ran, timings), ``circuits.md``
(:func:`report_section`) and ``plots/<task>/*.png`` (heatmaps per condition; per difference from base,
each map divided by its L1 norm, i.e. what the normalised L1 distance sums).
All files are written atomically.
"""
from __future__ import annotations

import contextlib
import logging
import math
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from .errors import ConfigError, DataError
from .io import atomic_write_text, provenance, write_json, write_jsonl

if TYPE_CHECKING:  # torch is imported where it is used: config validation imports this module
    import torch

    from .engine import Prefix

log = logging.getLogger(__name__)

CONDITIONS = ("base", "icl", "ft")
METHODS = ("attribution", "activation", "both")
CORRUPTIONS = ("answer", "control")


# ================================================================================================
# Model anatomy and hooks
# ================================================================================================

@dataclass(frozen=True)
class Component:
    """One attention head (``head`` = its query-head index) or the MLP (``head is None``) of a layer."""

    layer: int
    head: int | None = None

    def column(self, n_heads: int) -> int:
        return n_heads if self.head is None else self.head

    def label(self) -> str:
        return f"L{self.layer}.MLP" if self.head is None else f"L{self.layer}.H{self.head}"


@dataclass
class Anatomy:
    """Where the hooked modules of a decoder-only model are, and the grid's shape."""

    layers: list[torch.nn.Module]
    n_heads: int
    head_dim: int

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def shape(self) -> tuple[int, int]:
        """The map's shape: layers x (heads + MLP)."""
        return (self.n_layers, self.n_heads + 1)

    def components(self) -> list[Component]:
        return [Component(l, h) for l in range(self.n_layers) for h in [*range(self.n_heads), None]]

    def labels(self) -> list[list[str]]:
        return [[Component(l, h).label() for h in [*range(self.n_heads), None]] for l in range(self.n_layers)]


def anatomy(model) -> Anatomy:
    """Find the decoder layers (a ModuleList whose blocks have ``self_attn.o_proj`` and ``mlp``)."""
    import torch

    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and all(
                hasattr(b, "self_attn") and hasattr(b.self_attn, "o_proj") and hasattr(b, "mlp") for b in module):
            layers = list(module)
            break
    else:
        raise ConfigError(f"{type(model).__name__}: no decoder layers with self_attn.o_proj and mlp found; "
                          "circuit analysis supports Qwen2/Llama/Mistral-style models")
    config = model.config
    n_heads = int(config.num_attention_heads)
    o_proj = layers[0].self_attn.o_proj
    in_features = getattr(o_proj, "in_features", None) or o_proj.weight.shape[1]
    head_dim = getattr(config, "head_dim", None) or in_features // n_heads
    if n_heads * head_dim != in_features:
        raise ConfigError(f"o_proj takes {in_features} features, not heads x head_dim = {n_heads} x {head_dim}")
    return Anatomy(layers, n_heads, int(head_dim))


@dataclass
class Trace:
    """What one hooked forward pass returns: the last position's logits and, on request, the
    components' activations (``attn[l]``: [B, T, H, D]; ``mlp[l]``: [B, T, d_model]) and the zero
    tensors added to them for gradients (same keys and shapes)."""

    logits: torch.Tensor  # [B, V], float32
    attn: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)
    attn_delta: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp_delta: dict[int, torch.Tensor] = field(default_factory=dict)


class _Hooks:
    """Forward hooks that patch, record and attach gradient probes to every component."""

    def __init__(self, anat: Anatomy, patches: Sequence[Mapping[Component, torch.Tensor]], capture: bool,
                 attach_grad: bool, trace: Trace):
        self.anat, self.capture, self.attach_grad, self.trace = anat, capture, attach_grad, trace
        self.attn_patches: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
        self.mlp_patches: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for row, mapping in enumerate(patches):
            for comp, value in mapping.items():
                if comp.head is None:
                    self.mlp_patches.setdefault(comp.layer, []).append((row, value))
                else:
                    self.attn_patches.setdefault(comp.layer, []).append((row, comp.head, value))
        self.handles: list[Any] = []

    def __enter__(self) -> "_Hooks":
        for l, block in enumerate(self.anat.layers):
            self.handles.append(block.self_attn.o_proj.register_forward_pre_hook(self._attn_hook(l)))
            self.handles.append(block.mlp.register_forward_hook(self._mlp_hook(l)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _finish(self, x: torch.Tensor, store: dict, delta_store: dict, l: int) -> torch.Tensor:
        if self.capture:
            store[l] = x.detach()
        if self.attach_grad:
            import torch

            delta = torch.zeros_like(x, requires_grad=True)
            delta_store[l] = delta
            x = x + delta
        return x

    def _attn_hook(self, l: int) -> Callable:
        def hook(module, args):
            x = args[0]
            b, t, _ = x.shape
            heads = x.reshape(b, t, self.anat.n_heads, self.anat.head_dim)
            if l in self.attn_patches:
                heads = heads.clone()
                for row, head, value in self.attn_patches[l]:
                    heads[row, :, head, :] = value.to(heads.dtype)
            heads = self._finish(heads, self.trace.attn, self.trace.attn_delta, l)
            return (heads.reshape(b, t, -1), *args[1:])
        return hook

    def _mlp_hook(self, l: int) -> Callable:
        def hook(module, args, output):
            x = output
            if l in self.mlp_patches:
                x = x.clone()
                for row, value in self.mlp_patches[l]:
                    x[row] = value.to(x.dtype)
            return self._finish(x, self.trace.mlp, self.trace.mlp_delta, l)
        return hook


# ================================================================================================
# Prompts: a shared (cached) prefix (engine.Prefix, engine.build_prefix) plus each run's own tokens
# ================================================================================================

def run_patched(model, anat: Anatomy, prefix: Prefix, rows: Sequence[Sequence[int]], *,
                patches: Sequence[Mapping[Component, torch.Tensor]] | None = None, capture: bool = False,
                attach_grad: bool = False) -> Trace:
    """The one generic routine: run ``prefix + row`` for each row (a batch; rows of equal length T),
    row ``i`` with the components in ``patches[i]`` replaced by the given activations (head:
    [T, head_dim], MLP: [T, d_model]) at every position; optionally record every component's
    activation and attach zero tensors for gradients.

    Gradients flow only when called under ``torch.enable_grad()`` with ``attach_grad``.
    """
    import torch

    patches = list(patches) if patches is not None else [{}] * len(rows)
    if len(patches) != len(rows) or len({len(r) for r in rows}) != 1:
        raise ValueError("run_patched: one patch mapping per row, and rows of equal length")
    batch, t = len(rows), len(rows[0])
    from .engine import device_of

    device = device_of(model)
    x = torch.tensor([list(r) for r in rows], device=device)
    p = prefix.length
    mask = torch.ones((batch, p + t), dtype=torch.long, device=device)
    positions = torch.arange(p, p + t, device=device).expand(batch, -1)
    cache = prefix.expanded(batch) if p else None
    trace = Trace(logits=None)
    with _Hooks(anat, patches, capture, attach_grad, trace):
        out = model(input_ids=x, attention_mask=mask, position_ids=positions, cache=cache,
                    use_cache=cache is not None, logits_to_keep=1)
    trace.logits = out.logits[:, -1, :].float()
    return trace


@contextlib.contextmanager
def _weights_frozen(model) -> Iterator[None]:
    """No gradients for the weights during attribution (only the activations' are needed)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# ================================================================================================
# Clean / corrupted pairs
# ================================================================================================

@dataclass(frozen=True)
class Pair:
    """A clean item and its corrupted twin (same length in tokens, different first answer token)."""

    item_id: str
    split: str
    clean_question: str
    clean_answer: str
    corrupt_question: str
    corrupt_answer: str
    edit: str  # what was changed, for people

    def to_dict(self) -> dict[str, str]:
        return dict(self.__dict__)


@dataclass
class PairTokens:
    """A pair tokenized for one condition's prompt: full prompt ids and the two answer tokens."""

    clean_ids: list[int]
    corrupt_ids: list[int]
    clean_token: int
    corrupt_token: int


@dataclass
class PairInputs:
    """What the patching routines take: the shared cached prefix and each run's remaining tokens."""

    prefix: Prefix
    clean_ids: list[int]
    corrupt_ids: list[int]
    clean_token: int
    corrupt_token: int

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """Logit difference clean-answer token minus corrupted-answer token, per batch row."""
        return logits[:, self.clean_token] - logits[:, self.corrupt_token]


def _expression_candidates(task, item, kind: str, rng) -> Iterator[tuple[str, str, str]]:
    from .tasks.expression import format_group

    groups = {g: list(item.meta[g]) for g in ("S", "Z", "C")}
    rebuilt = f"{format_group(groups['S'])}+{format_group(groups['Z'])}*{format_group(groups['C'])}="
    if rebuilt != item.question:
        raise DataError(f"{item.id}: the question cannot be rebuilt from meta S/Z/C (generator changed?)")
    target = "S" if kind == "answer" else "Z"
    deltas = [d for d in range(-9, 10) if d] if target == "S" else [d for d in range(-3, 4) if d]
    edits = [(j, d) for j in range(len(groups[target])) for d in deltas]
    rng.shuffle(edits)
    edits.sort(key=lambda e: -e[0])  # the group's last term first (stable: random delta order within)
    for j, d in edits:
        new = {g: list(v) for g, v in groups.items()}
        new[target][j] += d
        answer = sum(new["S"]) + sum(new["Z"]) * sum(new["C"])
        question = f"{format_group(new['S'])}+{format_group(new['Z'])}*{format_group(new['C'])}="
        yield question, str(answer), f"{target}[{j}] {groups[target][j]} -> {new[target][j]}"


def _boolean_candidates(task, item, kind: str, rng) -> Iterator[tuple[str, str, str]]:
    from .tasks.boolean import evaluate

    clause = item.meta["clause"]
    suffix = f" {clause} ="
    if not item.question.endswith(suffix):
        raise DataError(f"{item.id}: the question does not end with its clause {clause!r}")
    inner = item.question[: -len(suffix)]
    op, const = clause.split()
    flip_c = {"True": "False", "False": "True"}[const]
    flip_op = {"and": "or", "or": "and"}[op]
    for new_clause in (f"{op} {flip_c}", f"{flip_op} {const}", f"{flip_op} {flip_c}"):
        question = f"{inner} {new_clause} ="
        yield question, str(evaluate(question)), f"clause {clause!r} -> {new_clause!r}"


def _relation_candidates(task, item, kind: str, rng) -> Iterator[tuple[str, str, str]]:
    from .tasks.relation import TARGET, connected

    *line_texts, last = item.question.split("\n")
    lines = []
    for text in line_texts:
        words = text.removesuffix(".").split(" is connected with ")
        if len(words) != 2:
            raise DataError(f"{item.id}: cannot parse relation line {text!r}")
        lines.append((words[0], words[1]))
    cities = {c for pair in lines for c in pair}
    unused = [c for c in string.ascii_uppercase if c not in cities and c not in ("A", TARGET)]
    others = sorted(c for c in cities if c not in ("A", TARGET))
    rng.shuffle(unused)
    rng.shuffle(others)
    if TARGET in cities:  # Z renamed away; then (control: Z on its own chain) one city renamed to another
        renames = [(TARGET, c) for c in unused] + [(x, y) for x in others for y in others if x != y]
    else:  # a city renamed to Z
        renames = [(c, TARGET) for c in others]
    for old, new in renames:
        new_lines = [tuple(new if c == old else c for c in pair) for pair in lines]
        if any(x == y for x, y in new_lines):  # no "B is connected with B."
            continue
        question = "\n".join(f"{x} is connected with {y}." for x, y in new_lines) + "\n" + last
        yield question, "Yes" if connected(new_lines, "A", TARGET) else "No", f"city {old} -> {new}"


def _parity_candidates(task, item, kind: str, rng) -> Iterator[tuple[str, str, str]]:
    numbers = list(item.meta["numbers"])
    if "The sum of " + ", ".join(map(str, numbers)) + " is" != item.question:
        raise DataError(f"{item.id}: the question cannot be rebuilt from meta numbers (generator changed?)")
    edits = [(j, d) for j in range(len(numbers)) for d in (-1, 1) if 0 <= numbers[j] % 10 + d <= 9]
    rng.shuffle(edits)
    for j, d in edits:
        new = list(numbers)
        new[j] += d
        answer = "odd" if sum(n % 2 for n in new) % 2 else "even"
        yield "The sum of " + ", ".join(map(str, new)) + " is", answer, f"number[{j}] {numbers[j]} -> {new[j]}"


# task -> (corruption kinds it supports, candidate generator)
CORRUPTORS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "expression": (("answer", "control"), _expression_candidates),
    "boolean": (("answer",), _boolean_candidates),
    "relation": (("answer",), _relation_candidates),
    "parity": (("answer",), _parity_candidates),
}


def corruption_candidates(task, item, kind: str, seed: int) -> Iterator[tuple[str, str, str]]:
    """Minimal edits of ``item``'s question: ``(question, answer, description)``, in a seeded order."""
    from .rng import item_rng

    if task.name not in CORRUPTORS or kind not in CORRUPTORS[task.name][0]:
        raise ConfigError(f"circuits: no {kind!r} corruption for task {task.name!r}; supported: "
                          + "; ".join(f"{t}: {', '.join(k)}" for t, (k, _) in CORRUPTORS.items()))
    yield from CORRUPTORS[task.name][1](task, item, kind, item_rng(seed, "circuits", task.name, item.id))


def tokenize_pair(tokenizer, task, pair: Pair, demos: Sequence) -> PairTokens | str:
    """The pair's token ids under the prompt with ``demos``, or the reason it is unusable."""
    from .engine import encode
    from .prompts import build_prompt

    out = []
    for question, answer in ((pair.clean_question, pair.clean_answer), (pair.corrupt_question, pair.corrupt_answer)):
        prompt = build_prompt(task, question, demos)
        ids = encode(tokenizer, prompt)
        full = encode(tokenizer, prompt + task.answer_sep + answer)
        if full[:len(ids)] != ids or len(full) == len(ids):
            return "answer is not a continuation of the prompt"
        out.append((ids, full[len(ids):]))
    (clean_ids, clean_cont), (corrupt_ids, corrupt_cont) = out
    if len(clean_ids) != len(corrupt_ids):
        return "different token lengths"
    # The first answer token where the two answers differ. With real tokenizers that is the first
    # token; a byte-level tokenizer keeps a separator space apart, which is then appended to both.
    j = 0
    while j < min(len(clean_cont), len(corrupt_cont)) and clean_cont[j] == corrupt_cont[j]:
        j += 1
    if j == min(len(clean_cont), len(corrupt_cont)):
        return "same answer tokens"
    if j and tokenizer.decode(clean_cont[:j]).strip():
        return "same first answer token"
    return PairTokens(clean_ids + clean_cont[:j], corrupt_ids + corrupt_cont[:j], clean_cont[j], corrupt_cont[j])


def make_pairs(task, items: Sequence, tokenizer, demo_sets: Sequence[Sequence], n: int, kind: str,
               seed: int) -> tuple[list[Pair], dict[str, int]]:
    """The first ``n`` items (in order) that have a usable corrupted twin under every demo set.

    Returns the pairs and counts of what was skipped: ``items_without_pair`` and, per reason, how many
    candidate edits were rejected.
    """
    pairs: list[Pair] = []
    skipped: dict[str, int] = {"items_without_pair": 0}
    for item in items:
        if len(pairs) >= n:
            break
        for question, answer, edit in corruption_candidates(task, item, kind, seed):
            pair = Pair(item.id, item.split, item.question, item.answer, question, answer, edit)
            if answer == item.answer:
                reason = "same answer"
            else:
                reason = next((r for r in (tokenize_pair(tokenizer, task, pair, d) for d in demo_sets)
                               if isinstance(r, str)), None)
            if reason is None:
                pairs.append(pair)
                break
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            skipped["items_without_pair"] += 1
    return pairs, skipped


def pair_inputs(tokens: PairTokens, prefix: Prefix) -> PairInputs:
    """Split the prompts after the cached prefix when both start with its tokens (else no cache)."""
    p = len(prefix.ids)
    if (prefix.cache is not None and tokens.clean_ids[:p] == prefix.ids == tokens.corrupt_ids[:p]
            and len(tokens.clean_ids) > p):
        return PairInputs(prefix, tokens.clean_ids[p:], tokens.corrupt_ids[p:], tokens.clean_token,
                          tokens.corrupt_token)
    from .engine import empty_prefix

    return PairInputs(empty_prefix(), tokens.clean_ids, tokens.corrupt_ids, tokens.clean_token,
                      tokens.corrupt_token)


# ================================================================================================
# Patching: the thin wrappers around run_patched
# ================================================================================================

@dataclass
class PatchResult:
    """One pair in one condition: the metric on both runs and the maps (``anat.shape``, logit units)."""

    m_clean: float
    m_corrupt: float
    attribution: np.ndarray | None = None
    activation: np.ndarray | None = None


def capture(model, anat: Anatomy, prefix: Prefix, *rows: Sequence[int]) -> Trace:
    """Activations of every component on ``prefix + row`` for each row (one batch)."""
    import torch

    with torch.no_grad():
        return run_patched(model, anat, prefix, rows, capture=True)


def component_activation(trace: Trace, comp: Component, row: int = 0) -> torch.Tensor:
    """A component's recorded activation: [T, head_dim] for a head, [T, d_model] for the MLP."""
    return trace.mlp[comp.layer][row] if comp.head is None else trace.attn[comp.layer][row, :, comp.head, :]


def attribution_patching(model, anat: Anatomy, inputs: PairInputs) -> PatchResult:
    """Gradient x (clean - corrupted activation), summed over positions and dims, for every component.

    Clean and corrupted prompts run as one batch of two (row 0 clean, row 1 corrupted); the gradient
    of the corrupted row's metric does not reach the clean row, so this is the clean forward plus the
    corrupted forward and backward, in one pass each way.
    """
    import torch

    with torch.enable_grad(), _weights_frozen(model):
        trace = run_patched(model, anat, inputs.prefix, [inputs.clean_ids, inputs.corrupt_ids], capture=True,
                            attach_grad=True)
        metrics = inputs.metric(trace.logits)
        layers = range(anat.n_layers)
        grads = torch.autograd.grad(metrics[1], [trace.attn_delta[l] for l in layers]
                                    + [trace.mlp_delta[l] for l in layers])
    out = np.zeros(anat.shape)
    for l in layers:
        g_attn, g_mlp = grads[l][1].float(), grads[anat.n_layers + l][1].float()  # [T, H, D], [T, d]
        d_attn = trace.attn[l][0].float() - trace.attn[l][1].float()
        d_mlp = trace.mlp[l][0].float() - trace.mlp[l][1].float()
        out[l, :anat.n_heads] = (g_attn * d_attn).sum(dim=(0, 2)).cpu().numpy()
        out[l, anat.n_heads] = float((g_mlp * d_mlp).sum())
    m_clean, m_corrupt = metrics.detach().tolist()
    return PatchResult(m_clean, m_corrupt, attribution=out)


def activation_patching(model, anat: Anatomy, inputs: PairInputs, batch_size: int = 32,
                        components: Sequence[Component] | None = None) -> PatchResult:
    """Exact denoising patching: the corrupted run with one component set to its clean activation;
    effect = m_patched - m_corrupt, for every component (or those given)."""
    import torch

    with torch.no_grad():
        return _activation_patching(model, anat, inputs, batch_size, components)


def _activation_patching(model, anat, inputs, batch_size, components) -> PatchResult:
    base = capture(model, anat, inputs.prefix, inputs.clean_ids, inputs.corrupt_ids)
    m_clean, m_corrupt = inputs.metric(base.logits).tolist()
    comps = list(components) if components is not None else anat.components()
    out = np.full(anat.shape, np.nan)
    for start in range(0, len(comps), max(1, batch_size)):
        chunk = comps[start:start + batch_size]
        patches = [{c: component_activation(base, c, row=0)} for c in chunk]
        patched = run_patched(model, anat, inputs.prefix, [inputs.corrupt_ids] * len(chunk), patches=patches)
        for c, m in zip(chunk, inputs.metric(patched.logits).tolist()):
            out[c.layer, c.column(anat.n_heads)] = m - m_corrupt
    return PatchResult(m_clean, m_corrupt, activation=out)


def patch_pair(model, anat: Anatomy, inputs: PairInputs, method: str, batch_size: int = 32) -> PatchResult:
    """``method``: attribution, activation or both."""
    if method not in METHODS:
        raise ConfigError(f"circuits.method must be one of {', '.join(METHODS)}, got {method!r}")
    result = attribution_patching(model, anat, inputs) if method in ("attribution", "both") else None
    if method in ("activation", "both"):
        exact = activation_patching(model, anat, inputs, batch_size)
        if result is None:
            return exact
        result.activation = exact.activation
    return result


# ================================================================================================
# Shift metrics
# ================================================================================================

def _flat(a: np.ndarray) -> np.ndarray:
    """Maps [..., layers, columns] -> [..., layers * columns]."""
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(*a.shape[:-2], -1)


def cosine_distance(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """1 - cosine similarity along ``axis`` (NaN where a map is all zeros)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    na, nb = np.linalg.norm(a, axis=axis), np.linalg.norm(b, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1.0 - (a * b).sum(axis=axis) / (na * nb)


def l1_distance(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """0.5 * || a/|a|_1 - b/|b|_1 ||_1 along ``axis``, in [0, 1]: 0 = the same relative effects, 1 = no
    overlap (disjoint support, or every shared component with the opposite sign); NaN for an all-zero map."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        an = a / np.abs(a).sum(axis=axis, keepdims=True)
        bn = b / np.abs(b).sum(axis=axis, keepdims=True)
        return 0.5 * np.abs(an - bn).sum(axis=axis)


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Share of the ``k`` components with the largest |effect| in ``a`` that are also in ``b``'s top k
    (over the last axis; 1 = same set)."""
    a, b = np.abs(np.asarray(a, float)), np.abs(np.asarray(b, float))
    k = max(1, min(int(k), a.shape[-1]))
    ta = np.argsort(-a, axis=-1, kind="stable")[..., :k]
    tb = np.argsort(-b, axis=-1, kind="stable")[..., :k]
    hits = (ta[..., :, None] == tb[..., None, :]).any(-1).sum(-1)
    return hits / k


def shift(base: np.ndarray, other: np.ndarray, top_k: int) -> dict[str, Any]:
    """Distances of ``other`` from ``base`` (maps of shape [..., layers, columns]): overall and per layer."""
    fb, fo = _flat(base), _flat(other)
    return {
        "cosine_distance": cosine_distance(fb, fo),
        "l1_distance": l1_distance(fb, fo),
        "topk_overlap": topk_overlap(fb, fo, top_k),
        "per_layer": {"cosine_distance": cosine_distance(base, other), "l1_distance": l1_distance(base, other)},
    }


def _interval(samples: np.ndarray) -> list[float]:
    s = samples[np.isfinite(samples)] if samples.ndim == 1 else samples
    if s.size == 0:
        return [float("nan"), float("nan")]
    return [float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))]


def _interval_axis0(samples: np.ndarray) -> list[list[float]]:
    return [_interval(samples[:, j]) for j in range(samples.shape[1])]


def _num(x: Any) -> Any:
    """JSON-friendly floats: rounded, NaN -> None."""
    if isinstance(x, np.ndarray):
        return [_num(v) for v in x.tolist()]
    if isinstance(x, (list, tuple)):
        return [_num(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(f"{float(x):.6g}")
    if isinstance(x, np.integer):
        return int(x)
    return x


def bootstrap_shift(maps: Mapping[str, np.ndarray], top_k: int, n_boot: int, seed: int) -> dict[str, Any]:
    """Shift of every non-base condition from ``base`` with percentile 95% intervals.

    ``maps[cond]``: per-item maps [N, layers, columns], rows paired across conditions (the same item).
    Each resample draws N item indices with replacement, used by every condition. Also: ``icl - ft``
    (paired) when both exist, and the split-half reference (base vs base on two disjoint halves).
    """
    base = np.asarray(maps["base"], float)
    n = base.shape[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n)) if n_boot > 0 else np.zeros((0, n), dtype=int)
    weights = np.zeros((n_boot, n))
    np.add.at(weights, (np.repeat(np.arange(n_boot), n), idx.reshape(-1)), 1.0 / n)

    def resampled(x: np.ndarray) -> np.ndarray:
        return np.einsum("bn,nlc->blc", weights, x)

    base_b = resampled(base)
    out: dict[str, Any] = {"n_items": n, "n_boot": n_boot, "top_k": min(top_k, base[0].size), "seed": seed,
                           "conditions": {}}
    samples: dict[str, dict[str, np.ndarray]] = {}
    for cond, x in maps.items():
        if cond == "base":
            continue
        x = np.asarray(x, float)
        point = shift(base.mean(0), x.mean(0), top_k)
        boot = shift(base_b, resampled(x), top_k)
        samples[cond] = boot
        entry = {}
        for name in ("cosine_distance", "l1_distance", "topk_overlap"):
            entry[name] = {"value": _num(point[name]), "ci95": _num(_interval(boot[name]))}
        entry["per_layer"] = {name: {"value": _num(point["per_layer"][name]),
                                     "ci95": _num(_interval_axis0(boot["per_layer"][name]))}
                              for name in ("cosine_distance", "l1_distance")}
        out["conditions"][cond] = entry
    if "icl" in samples and "ft" in samples:
        diff: dict[str, Any] = {}
        point_icl = shift(base.mean(0), np.asarray(maps["icl"], float).mean(0), top_k)
        point_ft = shift(base.mean(0), np.asarray(maps["ft"], float).mean(0), top_k)
        for name in ("cosine_distance", "l1_distance", "topk_overlap"):
            d = samples["icl"][name] - samples["ft"][name]
            d = d[np.isfinite(d)]
            diff[name] = {"value": _num(point_icl[name] - point_ft[name]), "ci95": _num(_interval(d)),
                          "p_icl_greater": _num(float((d > 0).mean()) if d.size else float("nan"))}
        out["icl_minus_ft"] = diff
    # Reference: how far two disjoint halves of the items put the base map from itself.
    if n >= 4 and n_boot > 0:
        halves = {name: [] for name in ("cosine_distance", "l1_distance", "topk_overlap")}
        for _ in range(n_boot):
            perm = rng.permutation(n)
            a, b = base[perm[: n // 2]].mean(0), base[perm[n // 2: 2 * (n // 2)]].mean(0)
            s = shift(a, b, top_k)
            for name in halves:
                halves[name].append(float(s[name]))
        out["split_half_base"] = {name: {"median": _num(float(np.nanmedian(v))), "range95": _num(_interval(np.array(v)))}
                                  for name, v in halves.items()}
    return out


def agreement(attribution: np.ndarray, activation: np.ndarray, threshold: float = 0.1) -> dict[str, Any]:
    """How well attribution patching approximates exact patching on the same pairs ([N, L, C] each).

    Spearman rank correlation over all pair x component effects pooled, per pair (median) and between
    the mean maps; sign agreement over the pooled effects whose exact |effect| is at least
    ``threshold`` x the largest (the components that matter; tiny effects have no stable sign).
    """
    from scipy.stats import spearmanr

    att, act = _flat(np.asarray(attribution, float)), _flat(np.asarray(activation, float))
    per_pair = [float(spearmanr(a, b).statistic) for a, b in zip(att, act)]
    big = np.abs(act) >= threshold * np.abs(act).max()
    return {"n_pairs": len(per_pair),
            "spearman_pooled": _num(float(spearmanr(att.ravel(), act.ravel()).statistic)),
            "spearman_per_pair_median": _num(float(np.nanmedian(per_pair))),
            "spearman_mean_map": _num(float(spearmanr(att.mean(0), act.mean(0)).statistic)),
            "sign_agreement": _num(float((np.sign(att[big]) == np.sign(act[big])).mean())),
            "sign_threshold": threshold, "n_sign_cells": int(big.sum())}


# ================================================================================================
# Heatmaps
# ================================================================================================

def plot_map(values: np.ndarray, path: str | Path, title: str, n_heads: int, label: str) -> Path:
    """A layers x (heads + MLP) heatmap, diverging colours centred on 0, written atomically as PNG."""
    import io as _io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_write_bytes

    values = np.asarray(values, float)
    n_layers = values.shape[0]
    vmax = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    vmax = vmax or 1.0
    fig, ax = plt.subplots(figsize=(2.0 + 0.38 * (n_heads + 1), 1.5 + 0.28 * n_layers))
    im = ax.imshow(values, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.axvline(n_heads - 0.5, color="black", linewidth=1.5)
    ax.set_xticks(range(n_heads + 1), [*(str(h) for h in range(n_heads)), "MLP"], fontsize=7)
    ax.set_yticks(range(n_layers), [str(l) for l in range(n_layers)], fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=label, shrink=0.8)
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _unit_l1(a: np.ndarray) -> np.ndarray:
    s = np.abs(a).sum()
    return a / s if s > 0 else a


def plot_task(task: str, mean_maps: Mapping[str, np.ndarray], folder: Path, n_heads: int,
              method: str) -> dict[str, str]:
    """Heatmaps per condition (mean map, logits) and per difference from base (L1-normalised maps)."""
    paths = {}
    for cond, m in mean_maps.items():
        paths[cond] = str(plot_map(m, folder / f"{cond}.png", f"{task}: {cond} ({method}), mean over items",
                                   n_heads, "effect on logit diff"))
    for cond in ("icl", "ft"):
        if cond in mean_maps:
            diff = _unit_l1(mean_maps[cond]) - _unit_l1(mean_maps["base"])
            paths[f"{cond}_minus_base"] = str(plot_map(
                diff, folder / f"{cond}_minus_base.png",
                f"{task}: {cond} - base (each map / its L1 norm)", n_heads, "share of |effect|, difference"))
    return paths


# ================================================================================================
# The analysis: config -> results folder
# ================================================================================================

def validate_circuits_config(config: dict) -> None:
    """The ``circuits`` section's own checks (called by ``config.validate``)."""
    c = config.get("circuits")
    if c is None:  # a partial config built by hand
        return
    from .tasks import parse_task_list

    c["tasks"] = parse_task_list(c["tasks"])
    for task in c["tasks"]:
        if task not in CORRUPTORS:
            raise ConfigError(f"circuits.tasks: no corruption is defined for {task!r}; supported: {', '.join(CORRUPTORS)}")
        if c["corruption"] not in CORRUPTORS[task][0]:
            raise ConfigError(f"circuits.corruption {c['corruption']!r} is not defined for {task!r} "
                              f"(it has {', '.join(CORRUPTORS[task][0])})")
    if c["corruption"] not in CORRUPTIONS:
        raise ConfigError(f"circuits.corruption must be one of {', '.join(CORRUPTIONS)}, got {c['corruption']!r}")
    if c["method"] not in METHODS:
        raise ConfigError(f"circuits.method must be one of {', '.join(METHODS)}, got {c['method']!r}")
    if c["split"] not in ("pattern", "control"):
        raise ConfigError(f"circuits.split must be pattern or control, got {c['split']!r}")
    for key, lo in (("n_items", 1), ("shots", 1), ("batch_size", 1), ("top_k", 1), ("bootstrap", 0),
                    ("activation_items", 0)):
        if c[key] < lo:
            raise ConfigError(f"circuits.{key} must be >= {lo}, got {c[key]}")


def adapter_for(config: dict, task: str) -> str | None:
    """The FT condition's adapter folder for ``task`` (``{task}`` in circuits.adapter is replaced)."""
    pattern = config["circuits"]["adapter"]
    if not pattern:
        return None
    path = pattern.replace("{task}", task)
    if not (Path(path) / "adapter_config.json").is_file():
        raise ConfigError(f"circuits.adapter: {path} holds no adapter_config.json (finetune.py --out writes one)")
    return path


@dataclass
class _TaskState:
    task: Any
    pairs: list[Pair]
    demos: list
    skipped: dict[str, int]
    results: dict[str, list[PatchResult]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _run_condition(loaded, state: _TaskState, cond: str, demos: Sequence, c: dict, show_progress: bool) -> None:
    from tqdm.auto import tqdm

    from .engine import build_prefix
    from .prompts import prefix as prompt_prefix

    model, tokenizer = loaded.model, loaded.tokenizer
    anat = anatomy(model)
    started = time.perf_counter()
    pre = build_prefix(model, tokenizer, prompt_prefix(state.task, demos))
    results = []
    for n, pair in enumerate(tqdm(state.pairs, desc=f"{state.task.name}/{cond}", unit="pair",
                                  disable=not show_progress)):
        tokens = tokenize_pair(tokenizer, state.task, pair, demos)
        if isinstance(tokens, str):
            raise DataError(f"{pair.item_id}: pair unusable under {cond} ({tokens}); was another tokenizer loaded?")
        method = c["method"]
        if method == "attribution" and n < c["activation_items"]:
            method = "both"
        results.append(patch_pair(model, anat, pair_inputs(tokens, pre), method, c["batch_size"]))
    state.results[cond] = results
    state.seconds[cond] = round(time.perf_counter() - started, 2)


def _maps(results: Sequence[PatchResult], kind: str) -> np.ndarray | None:
    maps = [getattr(r, kind) for r in results]
    if not maps or any(m is None for m in maps):
        return None
    return np.stack(maps)


def summarise_task(state: _TaskState, c: dict, n_heads: int, labels: list[list[str]]) -> dict[str, Any]:
    """Everything circuits.json says about one task."""
    primary = "attribution" if c["method"] in ("attribution", "both") else "activation"
    out: dict[str, Any] = {"n_pairs": len(state.pairs), "skipped": state.skipped, "primary_method": primary,
                           "shots": c["shots"], "demo_ids": [d.id for d in state.demos], "seconds": state.seconds,
                           "component_labels": labels, "conditions": {}}
    per_item = {}
    rng = np.random.default_rng(c["seed"])
    for cond, results in state.results.items():
        m_clean = np.array([r.m_clean for r in results])
        m_corr = np.array([r.m_corrupt for r in results])
        effect = m_clean - m_corr
        idx = rng.integers(0, len(effect), size=(max(c["bootstrap"], 1), len(effect)))
        maps = _maps(results, primary)
        per_item[cond] = maps
        entry: dict[str, Any] = {
            "logit_diff_clean": _num(float(m_clean.mean())), "logit_diff_corrupt": _num(float(m_corr.mean())),
            "effect": {"value": _num(float(effect.mean())), "ci95": _num(_interval(effect[idx].mean(1)))},
            "clean_prefers_clean_answer": _num(float((m_clean > 0).mean())),
            "corrupt_prefers_corrupt_answer": _num(float((m_corr < 0).mean())),
            "map": _num(maps.mean(0)),
            "map_normalised": _num(maps.mean(0) / effect.mean()) if effect.mean() != 0 else None,
        }
        att, act = _maps(results, "attribution"), _maps(results, "activation")
        if att is None and act is None:
            pass
        elif act is None or att is None:
            subset = [r for r in results if r.attribution is not None and r.activation is not None]
            if subset:
                entry["agreement"] = agreement(np.stack([r.attribution for r in subset]),
                                               np.stack([r.activation for r in subset]))
        else:
            entry["agreement"] = agreement(att, act)
        top = np.argsort(-np.abs(maps.mean(0)).reshape(-1), kind="stable")[:10]
        flat_labels = [x for row in labels for x in row]
        entry["top_components"] = [{"component": flat_labels[i], "effect": _num(float(maps.mean(0).reshape(-1)[i]))}
                                   for i in top]
        out["conditions"][cond] = entry
    if "base" in per_item and len(per_item) > 1:
        out["shift"] = bootstrap_shift(per_item, c["top_k"], c["bootstrap"], c["seed"])
    return out


def analyze(config: dict, data_dir: str | Path, out: str | Path, show_progress: bool = True,
            argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the circuit analysis for ``config`` (its ``circuits`` section, ``model``, ``dtype``) on the
    generated data in ``data_dir``; write the results folder ``out`` and return circuits.json's content."""
    from .data import load_items
    from .evaluate import demo_order
    from .models import load_model
    from .tasks import get_task

    c = config["circuits"]
    out = Path(out)
    started = time.perf_counter()
    write_json(out / "config.json", {"config": config, "provenance": provenance(), "argv": list(argv or []),
                                     "data": str(data_dir)})
    adapters = {t: adapter_for(config, t) for t in c["tasks"]}  # fail early on a missing adapter
    load_kw = dict(dtype=c["dtype"] or config["dtype"], attn_implementation=config["attn_implementation"])
    base = load_model(config["model"], **load_kw)
    states: dict[str, _TaskState] = {}
    for name in c["tasks"]:
        task = get_task(name, config["data"]["task_params"].get(name))
        items = load_items(data_dir, name, "test", split=c["split"])
        if not items:
            raise DataError(f"{data_dir}/{name}/test.jsonl has no {c['split']} items")
        pool = load_items(data_dir, name, "train", split=config["eval"]["demo_split"])
        demos = demo_order(pool, c["demo_seed"], name, c["shots"])
        pairs, skipped = make_pairs(task, items, base.tokenizer, [[], demos], c["n_items"], c["corruption"], c["seed"])
        if len(pairs) < 2:
            raise DataError(f"{name}: only {len(pairs)} usable clean/corrupted pairs among {len(items)} items "
                            f"(skipped: {skipped})")
        if len(pairs) < c["n_items"]:
            log.warning("%s: %d pairs (asked for %d): too few items with a usable twin", name, len(pairs), c["n_items"])
        states[name] = state = _TaskState(task, pairs, demos, skipped)
        _run_condition(base, state, "base", [], c, show_progress)
        _run_condition(base, state, "icl", demos, c, show_progress)
    anat = anatomy(base.model)
    n_layers, n_heads, labels = anat.n_layers, anat.n_heads, anat.labels()
    model_info = {"base": base.info}
    del base, anat  # free the base model before loading the fine-tuned one
    for name, state in states.items():
        if adapters[name] is None:
            continue
        ft = load_model(config["model"], adapter=adapters[name], merge_adapter=True, **load_kw)
        model_info[f"ft/{name}"] = ft.info
        _run_condition(ft, state, "ft", [], c, show_progress)
        del ft

    rows, tasks_out, plots = [], {}, {}
    for name, state in states.items():
        summary = summarise_task(state, c, n_heads, labels)
        summary["adapter"] = adapters[name]
        tasks_out[name] = summary
        mean_maps = {cond: np.array(e["map"], dtype=float) for cond, e in summary["conditions"].items()}
        written = plot_task(name, mean_maps, out / "plots" / name, n_heads, summary["primary_method"])
        plots[name] = {k: Path(v).relative_to(out).as_posix() for k, v in written.items()}
        for cond, results in state.results.items():
            for pair, r in zip(state.pairs, results):
                rows.append({"task": name, "condition": cond, **pair.to_dict(), "logit_diff_clean": _num(r.m_clean),
                             "logit_diff_corrupt": _num(r.m_corrupt), "attribution": _num(r.attribution) if r.attribution is not None else None,
                             "activation": _num(r.activation) if r.activation is not None else None})
    result = {
        "model": config["model"], "models": model_info, "method": c["method"], "corruption": c["corruption"],
        "split": c["split"], "grid": {"layers": n_layers, "heads": n_heads, "columns": "heads 0..H-1, then MLP"},
        "tasks": tasks_out, "plots": plots, "wall_seconds": round(time.perf_counter() - started, 1),
        "provenance": provenance(),
    }
    write_jsonl(out / "scores.jsonl", rows)
    write_json(out / "circuits.json", result)
    atomic_write_text(out / "circuits.md", report_section(result))
    return result


# ================================================================================================
# Report
# ================================================================================================

def _fmt(stat: dict | None, digits: int = 3) -> str:
    if not stat or stat.get("value") is None:
        return "–"
    lo, hi = stat.get("ci95") or (None, None)
    if lo is None or hi is None:
        return f"{stat['value']:.{digits}f}"
    return f"{stat['value']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _ordered(by_condition: dict) -> list[tuple[str, Any]]:
    """Entries in the order base, icl, ft (JSON files keep keys sorted)."""
    return [(c, by_condition[c]) for c in CONDITIONS if c in by_condition]


def _verdict(diff: dict, similarity: bool) -> str:
    """Whether a paired ICL - FT difference supports the paper's claim (ICL shifts more than FT)."""
    lo, hi = diff.get("ci95") or (None, None)
    if lo is None or hi is None:
        return "no interval"
    icl_more, ft_more = (hi < 0, lo > 0) if similarity else (lo > 0, hi < 0)
    if icl_more:
        return "ICL shifts more (supports the claim)"
    if ft_more:
        return "FT shifts more (contradicts the claim)"
    return "no clear difference (interval includes 0)"


def report_section(result: dict, link_prefix: str = "") -> str:
    """A markdown section (for the reproduce report and circuits.md) from circuits.json's content;
    heatmap links (relative to the results folder) get ``link_prefix`` in front."""
    lines = ["## Circuit shift", "",
             f"Model {result['model']}; method {result['method']}; corruption {result['corruption']} on "
             f"{result['split']} items; grid {result['grid']['layers']} layers x {result['grid']['heads']} heads + MLP. "
             "Shift = distance of each condition's mean attribution map from the base (zero-shot) map: "
             "1 - cosine and normalised L1 (0 = same, higher = more shift), top-k overlap (1 = same top-k "
             "components). Brackets: 95% bootstrap interval over items.", ""]
    for task, t in result["tasks"].items():
        lines += [f"### {task}", "",
                  f"{t['n_pairs']} clean/corrupted pairs; ICL with {t['shots']} demonstrations; FT adapter: "
                  f"{t.get('adapter') or 'none (FT condition not run)'}.", "",
                  "| condition | logit diff clean | logit diff corrupted | effect (clean - corrupted) |",
                  "|---|---|---|---|"]
        for cond, e in _ordered(t["conditions"]):
            lines.append(f"| {cond} | {e['logit_diff_clean']:.2f} | {e['logit_diff_corrupt']:.2f} | {_fmt(e['effect'], 2)} |")
        s = t.get("shift")
        if s:
            lines += ["", f"| shift from base | 1 - cosine | normalised L1 | top-{s['top_k']} overlap |", "|---|---|---|---|"]
            for cond, e in _ordered(s["conditions"]):
                lines.append(f"| {cond} | {_fmt(e['cosine_distance'])} | {_fmt(e['l1_distance'])} | {_fmt(e['topk_overlap'])} |")
            if "icl_minus_ft" in s:
                d = s["icl_minus_ft"]
                lines.append(f"| ICL - FT | {_fmt(d['cosine_distance'])} | {_fmt(d['l1_distance'])} | {_fmt(d['topk_overlap'])} |")
            if "split_half_base" in s:
                h = s["split_half_base"]
                lines.append("| base vs base, two halves of the items (reference) | "
                             + " | ".join(f"{h[k]['median']:.3f}" if h[k]["median"] is not None else "–"
                                          for k in ("cosine_distance", "l1_distance", "topk_overlap")) + " |")
            if "icl_minus_ft" in s:
                lines += ["", "ICL - FT is the paired difference of the two shifts (for the top-k overlap, a similarity, "
                              "a negative difference means ICL moved further from base). Per metric: "
                              + "; ".join(f"{name}: {_verdict(s['icl_minus_ft'][name], name == 'topk_overlap')}"
                                          for name in ("cosine_distance", "l1_distance", "topk_overlap")) + "."]
        agree = {cond: e["agreement"] for cond, e in _ordered(t["conditions"]) if "agreement" in e}
        if agree:
            lines += ["", "Attribution vs exact activation patching: " + "; ".join(
                f"{cond}: Spearman {a['spearman_pooled']:.3f} over pair x component effects ({a['n_pairs']} pairs; "
                f"median pair {a['spearman_per_pair_median']:.3f}), same sign on {a['sign_agreement']:.0%} of the "
                f"{a['n_sign_cells']} effects >= {a['sign_threshold']:g} x the largest" for cond, a in agree.items()) + "."]
        plots = result.get("plots", {}).get(task, {})
        if plots:
            order = [k for k in ("base", "icl", "ft", "icl_minus_base", "ft_minus_base") if k in plots]
            lines += ["", "Heatmaps: " + ", ".join(f"[{k}]({link_prefix}{plots[k]})" for k in order) + "."]
        lines.append("")
    return "\n".join(lines) + "\n"
