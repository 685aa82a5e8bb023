"""report.md from the study's summary: the headline verdicts, then per task the ICL and FT tables
beside what constant answers score."""
from __future__ import annotations

from pathlib import Path

from ..metrics import fmt_ci, fmt_pct

VERDICT_TEXT = {
    "supports": "supports the paper's claim: ICL beats FT on pattern items (the exact paired test rejects after "
                "Holm's correction over the report's verdicts)",
    "contradicts": "contradicts the paper's claim: FT beats ICL on pattern items (the exact paired test rejects "
                   "after Holm's correction over the report's verdicts)",
    "no clear difference": "shows no clear difference between ICL and FT on pattern items (the exact paired test, "
                           "Holm-corrected, does not reject)",
    "incomplete": "cannot be judged (the declared ICL or FT cell is missing)",
    "ICL only": "has no verdict: the preset fine-tunes no model on this task (ICL only)",
    "no verdict (invalid)": "gives no verdict: most answers of a compared cell are unparseable (invalid share on "
                            "pattern items above reproduce.max_invalid), so its accuracy says little about what the "
                            "model learned",
}

RULE = ("**Verdict rule.** ICL − FT on the same pattern items. The test: McNemar's exact test on the discordant items "
        "when each side has one seed; with several seeds (demo sets for ICL, train seeds for FT), the larger p of the "
        "exact paired test of the seed-averaged items and a t-test whose variance adds each side's variance between "
        "seeds. *supports* / *contradicts* the paper only when that p, Holm-adjusted over the family of this report's "
        "verdicts ({family}), is below {alpha}; a compared cell with more than reproduce.max_invalid invalid answers on "
        "pattern items gives *no verdict (invalid)* and is not in the family. Interval: Tango's score interval for "
        "paired proportions (one seed a side), else the hull of the seeds-and-items t-interval and the score interval "
        "of the seed-averaged items. *FT rows to reach ICL*: the smallest N at which FT is not significantly worse "
        "than the ICL cell (the same exact test, uncorrected) and stays so for every larger N; *not defined* when the "
        "ICL cell's interval does not clear what a constant answer scores.")

SMOKE = ("> **Smoke test.** This preset checks that the pipeline runs end to end; its models, items and training "
         "are too small for any number below to be a finding about ICL or FT.")

INTRO = (
    "Accuracy in % (strict parse: the completion must start with the answer), with 95% intervals: Wilson over "
    "items for one seed; with several seeds (demo sets for ICL, train seeds for FT) a bootstrap that resamples "
    "seeds, then items, so the interval carries both (never narrower than the Wilson interval of the seed-averaged "
    "score over the items). *Shortcut (control)*: share of control predictions equal "
    "to the shortcut answer. *Shortcut, balanced*: on control items, the mean over the shortcut's labels of "
    "P(prediction = that label | the shortcut says it): a constant answer scores 50 whatever the label balance, "
    "following the shortcut 100, computing the answer 0; \"–\" where the control items' shortcut has one label "
    "(relation: Z is always mentioned), so label bias and shortcut use cannot be told apart there: read the "
    "plain shortcut rate against the constant-answer baselines under each task.")


def _diff(d: dict | None) -> str:
    if not d:
        return "–"
    lo, hi = d["ci95"]
    return f"{100 * d['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _p(p: float | None) -> str:
    return "–" if p is None else f"{p:.2g}" if p >= 0.001 else "<0.001"


def _verdict_cell(t: dict) -> str:
    """The verdict, with its cause when a compared cell is over the invalid limit."""
    flagged = t["comparison"].get("invalid_flagged") or {}
    if t["verdict"] == "no verdict (invalid)" and flagged:
        return t["verdict"] + ": " + ", ".join(f"{side} {fmt_pct(share)}% invalid" for side, share in flagged.items())
    return t["verdict"]


def _match(n: int | str | None) -> str:
    return str(n) if n is not None else "not reached"


def _balanced(c: dict | None) -> str:
    sb = (c or {}).get("shortcut_balanced")
    return fmt_pct(sb["mean"]) if sb else "–"


def _cell(r: dict | None) -> dict:
    return r or {}


def headline(summary: dict) -> list[str]:
    family = summary.get("family") or {}
    size = family.get("size", 0)
    scope = "all models' tasks" if family.get("models", 1) > 1 else "its tasks"
    lines = ["## Headline", "",
             "ICL and FT compared on the same pattern items at cells fixed by the config before scoring "
             "(rule under each task); *best* cells are not used, since a maximum over cells is optimistic.", "",
             RULE.format(family=f"{size} comparison{'s' if size != 1 else ''}: {scope}",
                         alpha=family.get("alpha", 0.05)), "",
             "| task | ICL (k, seeds) pattern | FT (protocol, N, seeds) pattern | ICL − FT [95%] | p | p (Holm) | verdict "
             "| shortcut, balanced: ICL / FT | FT rows to reach ICL |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task, t in summary["tasks"].items():
        comp = t["comparison"]
        icl = next((r for r in t["icl"] if r["k"] == comp["shots"]), None)
        ft = next((r for r in t["ft"] if r["protocol"] == comp["protocol"] and r["n_train"] == comp["n_train"]), None)
        icl_s = (f"{fmt_ci(_cell(_cell(icl).get('pattern')).get('accuracy'))} (k={comp['shots']}, "
                 f"{icl.get('n_seeds', 1)})" if icl else "–")
        ft_s = (f"{fmt_ci(_cell(_cell(ft).get('pattern')).get('accuracy'))} ({comp['protocol']}, N={comp['n_train']}, "
                f"{len(ft.get('train_seeds', []))})" if ft else "–")
        match = ", ".join(f"{p}: {_match(n)}" for p, n in t["ft_rows_to_match_icl"].items()) or "–"
        d = comp.get("icl_minus_ft")
        lines.append(f"| {task} | {icl_s} | {ft_s} | {_diff(d)} | {_p((d or {}).get('p'))} | "
                     f"{_p(comp.get('p_adjusted'))} | {_verdict_cell(t)} | {_balanced(icl)} / {_balanced(ft)} | {match} |")
    return lines + [""]


def baseline_lines(t: dict) -> list[str]:
    b = t.get("baselines") or {}
    if not b:
        return []
    parts = []
    for split in ("pattern", "control"):
        s = b.get(split)
        if s:
            text = f"{split}: answering `{s['majority_answer']}` always scores {fmt_pct(s['majority_accuracy'])}"
            if s.get("majority_shortcut_rate") is not None and split == "control":
                text += f" (shortcut rate {fmt_pct(s['majority_shortcut_rate'])})"
            if s.get("shortcut_accuracy") is not None:
                text += f"; answering the shortcut always scores {fmt_pct(s['shortcut_accuracy'])}"
            parts.append(text)
    return ["Constant-answer baselines (" + "; ".join(parts) + ").", ""]


def condition_table(rows: list[dict], ft: bool) -> list[str]:
    head = ("| protocol | method | N | seeds | steps | final loss " if ft else "| k | seeds ")
    lines = [head + "| pattern | control | shortcut (control) | shortcut, balanced | invalid (pattern / control) "
             "| lenient (pattern) | constrained (pattern) |",
             "|---" * (6 if ft else 2) + "|---|---|---|---|---|---|---|"]
    for r in rows:
        p, c = _cell(r.get("pattern")), _cell(r.get("control"))
        lead = (f"| {r['protocol']} | {r['method']} | {r['n_train']} | {len(r['train_seeds'])} | "
                f"{_train_cells(r.get('train', []))} " if ft else f"| {r['k']} | {r.get('n_seeds', 1)} ")
        lines.append(lead + f"| {fmt_ci(p.get('accuracy'))} | {fmt_ci(c.get('accuracy'))} | "
                     f"{fmt_ci(c.get('shortcut_rate'))} | {_balanced(r)} | "
                     f"{fmt_pct((p.get('invalid') or {}).get('mean'))} / {fmt_pct((c.get('invalid') or {}).get('mean'))} | "
                     f"{fmt_ci(p.get('lenient_accuracy'))} | {fmt_ci(p.get('constrained_accuracy'))} |")
    return lines + [""]


def _train_cells(train: list[dict]) -> str:
    """The FT table's steps and final-loss cells: one value per train seed ("–" where unknown)."""
    steps = ", ".join(str(t["steps"]) if t.get("steps") is not None else "–" for t in train) or "–"
    losses = ", ".join(f"{t['final_loss']:.3g}" if t.get("final_loss") is not None else "–" for t in train) or "–"
    return f"{steps} | {losses}"


def protocol_comparison(summary: dict) -> list[str]:
    """Protocols side by side on the same rows (task, N): the claim may hinge on the FT protocol."""
    protocols = sorted({r["protocol"] for t in summary["tasks"].values() for r in t["ft"]})
    if len(protocols) < 2:
        return []
    lines = ["## FT protocols compared on the same rows", "",
             "Pattern accuracy / control accuracy / shortcut rate on control, zero-shot after fine-tuning.", "",
             "| task | N | " + " | ".join(protocols) + " |", "|---|---|" + "---|" * len(protocols)]
    for task, t in summary["tasks"].items():
        by_n: dict[int, dict[str, dict]] = {}
        for r in t["ft"]:
            by_n.setdefault(r["n_train"], {})[r["protocol"]] = r
        for n, rows in sorted(by_n.items()):
            if len(rows) < 2:
                continue
            cells = []
            for p in protocols:
                r = rows.get(p)
                if not r:
                    cells.append("–")
                    continue
                pa, ca = _cell(r.get("pattern")), _cell(r.get("control"))
                cells.append(" / ".join(fmt_pct((s or {}).get("mean")) for s in
                                        (pa.get("accuracy"), ca.get("accuracy"), ca.get("shortcut_rate"))))
            lines.append(f"| {task} | {n} | " + " | ".join(cells) + " |")
    return lines + [""]


def _best_icl(t: dict) -> tuple[int | None, dict | None]:
    """The ICL cell with the highest pattern accuracy (a descriptive maximum, not a verdict's cell)."""
    cells = [r for r in t["icl"] if (r.get("pattern") or {}).get("accuracy")]
    best = max(cells, key=lambda r: (r["pattern"]["accuracy"]["mean"], -r["k"]), default=None)
    return (best["k"], best["pattern"]["accuracy"]) if best else (None, None)


def size_table(summaries: list[dict]) -> list[str]:
    """Accuracy vs model size: per task and model, the best ICL cell and FT at each N (pattern items)."""
    if len(summaries) < 2:
        return []
    order = sorted(summaries, key=lambda s: (s.get("n_params") or 0, s["model"]))
    cols = sorted({(r["protocol"], r["n_train"]) for s in order for t in s["tasks"].values() for r in t["ft"]})
    lines = ["## Accuracy vs model size", "",
             "Pattern accuracy in % [95%]: the best ICL cell (its k; a maximum over k, so optimistic: descriptive "
             "only) and each FT protocol at each N, per model, smallest first. Verdicts stay per model, above.", "",
             "| task | model | parameters | best ICL (k) | " + " | ".join(f"FT {p} N={n}" for p, n in cols) + " |",
             "|---|---|---|---|" + "---|" * len(cols)]
    tasks = list(order[0]["tasks"])
    for task in tasks:
        for s in order:
            t = s["tasks"].get(task)
            if t is None:
                continue
            k, acc = _best_icl(t)
            ft = {(r["protocol"], r["n_train"]): (r.get("pattern") or {}).get("accuracy") for r in t["ft"]}
            params = f"{s['n_params'] / 1e6:,.0f}M" if s.get("n_params") else "–"
            lines.append(f"| {task} | {s['model']} | {params} | {fmt_ci(acc)} ({k if k is not None else '–'}) | "
                         + " | ".join(fmt_ci(ft.get(c)) for c in cols) + " |")
    return lines + [""]


def precision_line(precision: dict | None) -> str:
    """What the run computed in (config ``dtype: auto`` resolves per machine); "" when nothing recorded it."""
    if not precision or not (precision.get("evaluation") or precision.get("training")):
        return ""
    parts = [f"{side} in {' and '.join(precision[side])}" for side in ("evaluation", "training") if precision.get(side)]
    return (f"Precision: {', '.join(parts)} (as resolved on the machine that ran it; `dtype: auto` is bf16 on a CPU "
            "with native bf16 or a GPU, else fp32, and a run in another precision can differ on near-ties).")


def render(summary: dict, plots: dict[str, list[str]], extra_sections: list[str] = ()) -> str:
    lines = [f"# ICL vs FT on implicit patterns: {summary['model']} (config `{summary['config']}`)", ""]
    if summary.get("smoke"):
        lines += [SMOKE, ""]
    style = summary.get("prompt_style", "raw")
    how = "the model's chat template (the prompt as the user's message)" if style == "chat" else "raw text"
    lines += [f"Prompts: {how} (`prompt_style: {style}`), format `{summary.get('format', 'ours')}`, for ICL, FT and "
              "scoring alike.", ""]
    if line := precision_line(summary.get("precision")):
        lines += [line, ""]
    lines += [INTRO, ""]
    lines += headline(summary)
    lines += list(extra_sections)
    for task, t in summary["tasks"].items():
        comp = t["comparison"]
        cause = _verdict_cell(t)[len(t["verdict"]):].lstrip(": ")
        lines += [f"## {task}", "", f"This run {VERDICT_TEXT[t['verdict']]}{f' ({cause})' if cause else ''}. "
                  f"Compared cells: ICL k={comp['shots']} "
                  f"vs FT {comp['protocol']} N={comp['n_train']} ({comp['rule']}).", ""]
        lines += baseline_lines(t)
        if t["icl"]:
            lines += ["ICL (base model, k demonstrations from the train pattern rows; k = 0 is zero-shot):", ""]
            lines += condition_table(t["icl"], ft=False)
        if t["ft"]:
            lines += ["FT (zero-shot after fine-tuning on the first N train pattern rows; *steps* and *final loss* "
                      "per train seed, the loss over the tokens the protocol trains on):", ""]
            lines += condition_table(t["ft"], ft=True)
        for path in plots.get(task, []):
            lines += [f"![{Path(path).stem}]({path})", ""]
    return "\n".join(lines) + "\n"
