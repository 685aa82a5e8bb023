"""The study's numbers per task, from test.py's folders: ICL and FT conditions with intervals over
seeds and items, the constant-answer baselines, the paired ICL-vs-FT comparison at the declared k
and N, and the FT rows needed to reach the ICL level."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..evaluate.samples import read_samples
from ..evaluate.tables import aligned, split_metrics
from ..io import read_json
from ..metrics import ALPHA, baselines, holm, paired_difference, rows_to_match, shortcut_balanced, verdict

SPLITS = ("pattern", "control")


@dataclass
class FTResult:
    """One fine-tuned model's zero-shot evaluation folder, for the tasks it was trained on."""

    protocol: str
    method: str
    tasks: tuple[str, ...]  # the tasks it was fine-tuned on (one, or a mixed set)
    n_train: int
    train_seed: int
    metrics_path: Path  # test.py's metrics.json; samples.jsonl beside it
    train_summary: dict = field(default_factory=dict)
    cells: tuple[str, ...] | None = None  # the cell keys the study planned for this folder (None: all)


@dataclass(frozen=True)
class Comparison:
    """The declared rule that picks the compared cells, fixed before any test item is scored:
    ICL at ``shots`` demonstrations vs FT protocol ``protocol`` at ``n_train`` rows (-1 / 0: the
    largest k of the ICL sweep / the largest N the protocol trains; empty protocol: the first)."""

    shots: int = -1
    n_train: int = 0
    protocol: str = ""
    max_invalid: float = 0.5  # a compared cell with a larger invalid share on pattern items gives no verdict


def planned_rows(metrics_path: Path, cells: Iterable[str] | None = None) -> list[dict]:
    """The rows of the samples.jsonl beside a metrics.json, of the cell keys ``cells`` when given (a
    folder also keeps the cells of earlier runs, e.g. with more demo seeds, which a study whose config
    plans fewer must not count); [] when there is no metrics.json."""
    if not Path(metrics_path).is_file():
        return []
    keep = set(cells) if cells is not None else None
    return [r for r in read_samples(Path(metrics_path).parent / "samples.jsonl") if keep is None or r["cell"] in keep]


def _by_cell(rows: list[dict], task: str, k: int | None = None) -> dict[tuple[int, Any], list[dict]]:
    """``(k, demo seed) -> rows`` of ``task`` (of one k when given)."""
    out: dict[tuple[int, Any], list[dict]] = {}
    for r in rows:
        if r["task"] == task and (k is None or r["k"] == k):
            out.setdefault((r["k"], r["demo_seed"]), []).append(r)
    return out


def seeds_by_k(rows: list[dict], task: str) -> dict[int, list[list[dict]]]:
    """``k -> one list of rows per demo seed`` of ``task``, in (k, seed) order."""
    out: dict[int, list[list[dict]]] = {}
    for (k, _seed), part in sorted(_by_cell(rows, task).items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        out.setdefault(k, []).append(part)
    return out


def condition(seeds: list[list[dict]]) -> dict[str, Any]:
    """Every metric of one condition (a list of seeds' rows on the same items): per split, the mean
    and the seeds-then-items interval; on control items, the label-bias-corrected shortcut measure."""
    out: dict[str, Any] = {"n_seeds": len(seeds)}
    for split in SPLITS:
        per_seed = _split(seeds, split)
        out[split] = split_metrics(per_seed) if per_seed[0] else None
    control = [r for rows in seeds for r in rows if r["split"] == "control"]
    out["shortcut_balanced"] = shortcut_balanced([r["strict"] for r in control], [r["shortcut_answer"] for r in control])
    return out


def _split(seeds: list[list[dict]], split: str) -> list[list[dict]]:
    return [[r for r in rows if r["split"] == split] for rows in seeds]


def task_summary(task: str, icl_rows: list[dict], ft_runs: list[tuple[FTResult, list[dict]]],
                 compare: Comparison) -> dict:
    """One task's part of the summary, from the ICL folder's rows and each FT folder's rows."""
    t: dict[str, Any] = {"icl": [], "ft": [], "baselines": {}}
    icl_seeds = seeds_by_k(icl_rows, task)
    for k, seeds in sorted(icl_seeds.items()):
        t["icl"].append({"k": k, **condition(seeds)})
    items = next(iter(icl_seeds.values()), [[]])[0]
    for split in SPLITS:
        part = [r for r in items if r["split"] == split]
        if part:
            t["baselines"][split] = baselines([r["answer"] for r in part], [r["shortcut_answer"] for r in part])

    ft_seeds: dict[tuple[str, str, int], list[tuple[FTResult, list[dict]]]] = {}
    for r, ft_rows in ft_runs:
        if task in r.tasks:
            rows = _by_cell(ft_rows, task, k=0).get((0, None), [])
            if rows:
                ft_seeds.setdefault((r.protocol, r.method, r.n_train), []).append((r, rows))
    for (protocol, method, n), runs in sorted(ft_seeds.items()):
        runs.sort(key=lambda x: x[0].train_seed)
        t["ft"].append({"protocol": protocol, "method": method, "n_train": n,
                        "train_seeds": [r.train_seed for r, _ in runs],
                        "train": [{"seed": r.train_seed, "steps": r.train_summary.get("steps"),
                                   "final_loss": r.train_summary.get("final_loss")} for r, _ in runs],
                        **condition([rows for _, rows in runs])})

    # The declared comparison: paired over the same pattern items.
    shots = compare.shots if compare.shots >= 0 else max(icl_seeds, default=0)
    protocol = compare.protocol or next((r["protocol"] for r in t["ft"]), "")
    ns = sorted(r["n_train"] for r in t["ft"] if r["protocol"] == protocol)
    n_train = compare.n_train or (ns[-1] if ns else 0)
    t["comparison"] = {"shots": shots, "protocol": protocol, "n_train": n_train, "rule": (
        "declared in the config as reproduce.compare_*, before scoring" if compare.shots >= 0 and compare.n_train else
        "the largest k of the ICL sweep and the largest N of the protocol, fixed by the config before scoring")}
    icl_pattern = _split(icl_seeds[shots], "pattern") if shots in icl_seeds else None

    def icl_minus_ft(runs: list[tuple[FTResult, list[dict]]]) -> dict | None:
        if icl_pattern is None:
            return None
        ids, matrix = aligned(icl_pattern + _split([rows for _, rows in runs], "pattern"), "correct")
        # the pattern items both sides scored, in the same order
        return paired_difference(matrix[:len(icl_pattern)], matrix[len(icl_pattern):]) if ids else None

    diffs = {key: icl_minus_ft(runs) for key, runs in ft_seeds.items()}  # every FT cell against the ICL cell
    key = next(((p, m, n) for (p, m, n) in ft_seeds if p == protocol and n == n_train), None)
    t["comparison"]["icl_minus_ft"] = diff = diffs.get(key)
    # A side whose answers are mostly unparseable is not a measurement of what it learned: no verdict.
    icl_cell = next((r for r in t["icl"] if r["k"] == shots), None)
    ft_cell = next((r for r in t["ft"] if r["protocol"] == protocol and r["n_train"] == n_train), None)
    t["comparison"]["invalid_flagged"] = invalid_flagged(
        {side: ((cell or {}).get("pattern") or {}).get("invalid") for side, cell in (("ICL", icl_cell), ("FT", ft_cell))},
        compare.max_invalid)
    if not t["ft"]:
        t["comparison"]["icl_only"] = True  # the preset fine-tunes no model on this task
    t["verdict"] = preliminary_verdict(diff, t["comparison"]["invalid_flagged"], t["comparison"].get("icl_only", False))

    # FT rows to match the ICL cell: the smallest N not significantly worse, for good (metrics.rows_to_match).
    icl_acc = ((icl_cell or {}).get("pattern") or {}).get("accuracy")
    base = (t["baselines"].get("pattern") or {}).get("majority_accuracy")
    t["ft_rows_to_match_icl"] = {}
    for name in sorted({r["protocol"] for r in t["ft"]}):
        points = [(n, d) for (p, _m, n), d in diffs.items() if p == name]
        t["ft_rows_to_match_icl"][name] = rows_to_match(points, icl_acc, base)
    t["icl_level"] = icl_acc["mean"] if icl_acc else None
    return t


def invalid_flagged(invalid: dict[str, dict | None], max_invalid: float) -> dict[str, float]:
    """The compared sides (side -> their invalid-share stat on pattern items) over ``max_invalid``."""
    return {side: stat["mean"] for side, stat in invalid.items() if stat and stat["mean"] > max_invalid}


NO_VERDICT_INVALID = "no verdict (invalid)"


def preliminary_verdict(diff: dict | None, flagged: dict[str, float], icl_only: bool = False) -> str:
    """The verdict before the family is known (raw p); :func:`judge` makes it final."""
    if diff is not None and flagged:
        return NO_VERDICT_INVALID
    return "ICL only" if diff is None and icl_only else verdict(diff)


def judge(comparisons: list[dict], alpha: float = ALPHA) -> int:
    """The verdicts of one report, as one family: Holm's adjustment over every comparison that gets a
    verdict (those with a paired difference and no side over the invalid limit), then each verdict at
    ``alpha`` from its adjusted p. Each dict needs ``icl_minus_ft`` and ``invalid_flagged`` and gets
    ``p_adjusted``, ``family`` and ``verdict``. Returns the family size."""
    tested = [c for c in comparisons if c.get("icl_minus_ft") and not c.get("invalid_flagged")]
    adjusted = holm([c["icl_minus_ft"]["p"] for c in tested])
    for c, p in zip(tested, adjusted):
        c["p_adjusted"], c["family"] = p, len(tested)
        c["verdict"] = verdict(c["icl_minus_ft"], p, alpha)
    tested_ids = {id(c) for c in tested}
    for c in comparisons:
        if id(c) not in tested_ids:
            c["p_adjusted"], c["family"] = None, len(tested)
            c["verdict"] = preliminary_verdict(c.get("icl_minus_ft"), c.get("invalid_flagged") or {}, c.get("icl_only", False))
    return len(tested)


def judge_summaries(summaries: list[dict], alpha: float = ALPHA) -> int:
    """:func:`judge` over every task of every model of a report (the main study, the size sweep)."""
    tasks = [t for s in summaries for t in s["tasks"].values()]
    comparisons = [t["comparison"] for t in tasks]
    family = judge(comparisons, alpha)
    for t in tasks:
        t["verdict"] = t["comparison"]["verdict"]
    for s in summaries:
        s["family"] = {"size": family, "alpha": alpha, "correction": "Holm", "models": len(summaries)}
    return family


def precisions(icl_metrics: Path | None, ft_results: list[FTResult]) -> dict[str, list[str]]:
    """The dtypes the run computed in, as its folders recorded them: ``dtype: auto`` resolves per machine
    (bf16 on a CPU with native bf16 or a GPU, else fp32), and a run in another precision can give other
    numbers, so the report says which. ``evaluation``: the ICL folder's and the fine-tuned models'
    evaluations; ``training``: each FT run's training precision."""
    def evaluated(path: Path | None) -> str:
        identity = read_json(Path(path)).get("identity", {}) if path is not None else {}
        return str(identity.get("dtype") or "").removeprefix("torch.")

    evaluation = {evaluated(icl_metrics)} | {evaluated(r.metrics_path) for r in ft_results}
    training = {(r.train_summary.get("precision") or {}).get("dtype") for r in ft_results}
    return {"evaluation": sorted(d for d in evaluation if d), "training": sorted(d for d in training if d)}


def build_summary(tasks: list[str], icl_metrics: Path | None, ft_results: list[FTResult], model: str,
                  config_name: str, compare: Comparison = Comparison(), icl_cells: Iterable[str] | None = None,
                  smoke: bool = False, prompt_style: str = "raw", prompt_format: str = "ours") -> dict:
    """``icl_cells`` / ``FTResult.cells``: the cell keys the study planned (None: every cell of the folder);
    ``smoke``: the preset is a smoke test (the report says so at the top)."""
    icl_rows = planned_rows(icl_metrics, icl_cells) if icl_metrics else []  # each results folder read once
    ft_runs = [(r, planned_rows(r.metrics_path, r.cells)) for r in ft_results]
    n_params = next((r.train_summary.get("model_info", {}).get("n_params") for r in ft_results
                     if r.train_summary.get("model_info", {}).get("n_params")), None)
    return {"model": model, "config": config_name, "smoke": smoke, "prompt_style": prompt_style, "format": prompt_format,
            "n_params": n_params, "precision": precisions(icl_metrics, ft_results),
            "tasks": {task: task_summary(task, icl_rows, ft_runs, compare) for task in tasks}}
