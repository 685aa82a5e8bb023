"""The report's verdict, rows-to-match and baselines on hand-made result folders."""
import json
from pathlib import Path

import pytest

from iclvsft.metrics import Z95, wilson
from iclvsft.report import Comparison, FTResult, build_summary, write_report

N = 20  # pattern items (and as many control items)


def sample(cell, k, seed, split, i, correct, pred, answer="Yes", shortcut="Yes"):
    return {"cell": cell, "task": "relation", "k": k, "demo_seed": seed, "item_id": f"relation-test-{split}-{i:05d}",
            "split": split, "answer": answer, "shortcut_answer": shortcut, "strict": pred, "correct": correct,
            "lenient_correct": correct, "invalid": pred is None, "shortcut": pred == shortcut,
            "constrained_correct": None, "constrained_shortcut": None}


def folder(path: Path, cells: dict[tuple, callable]) -> Path:
    """samples.jsonl (+ an empty metrics.json marker) with, per (cell, k, seed), each item's prediction."""
    path.mkdir(parents=True)
    rows = []
    for (cell, k, seed), predict in cells.items():
        for i in range(N):  # pattern: answer Yes, shortcut Yes
            pred = predict("pattern", i)
            rows.append(sample(cell, k, seed, "pattern", i, pred == "Yes", pred))
        for i in range(N):  # control: answer No, shortcut Yes
            pred = predict("control", i)
            rows.append(sample(cell, k, seed, "control", i, pred == "No", pred, answer="No"))
    (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "metrics.json").write_text("{}")
    return path / "metrics.json"


def test_verdict_rows_to_match_and_baselines(tmp_path):
    always_yes = lambda split, i: "Yes"  # noqa: E731 - the shortcut on every item
    always_no = lambda split, i: "No"  # noqa: E731
    half = lambda split, i: "Yes" if i % 2 else "No"  # noqa: E731
    icl = folder(tmp_path / "icl", {("relation/k=0", 0, None): always_no,
                                    ("relation/k=4/seed=0", 4, 0): half, ("relation/k=4/seed=1", 4, 1): half})
    ft = [FTResult("answer_lora", "lora", ("relation",), n, 0, folder(tmp_path / f"ft{n}", {("relation/k=0", 0, None): f}))
          for n, f in ((16, always_no), (64, always_yes), (256, always_yes))]
    summary = build_summary(["relation"], icl, ft, "m", "test", Comparison())
    t = summary["tasks"]["relation"]
    # declared rule with zeros: the largest k (4) and the largest N (256) of the first protocol
    assert (t["comparison"]["shots"], t["comparison"]["n_train"], t["comparison"]["protocol"]) == (4, 256, "answer_lora")
    diff = t["comparison"]["icl_minus_ft"]
    assert diff["a"] == 0.5 and diff["b"] == 1.0 and diff["diff"] == -0.5 and diff["ci95"][1] < 0
    assert t["verdict"] == "contradicts"
    # two ICL seeds that agree: FT alone right on 10 seed-averaged items -> exact p = 2 * 0.5^10; the rule's p
    # is the larger of that and the seeds-and-items t-test's
    assert diff["p_exact_items"] == 2 * 0.5 ** 10 and diff["p"] >= diff["p_exact_items"]
    assert "p_adjusted" not in t["comparison"]  # judged, as one family, when the report is written
    ft16 = next(r for r in t["ft"] if r["n_train"] == 16)
    assert ft16["pattern"]["accuracy"]["ci95"] == list(wilson(0, N))
    # every pattern answer is "Yes": a constant scores 100%, so ICL's 50% cannot be matched meaningfully
    assert t["ft_rows_to_match_icl"] == {"answer_lora": "not defined"}
    # the constant "Yes" (the shortcut) scores 100% on pattern, 0% on control; its balanced shortcut measure is 0.5
    assert t["baselines"]["pattern"]["majority_accuracy"] == 1.0
    assert t["baselines"]["control"]["majority_answer"] == "No"
    ft256 = next(r for r in t["ft"] if r["n_train"] == 256)
    assert ft256["control"]["shortcut_rate"]["mean"] == 1.0
    assert ft256["shortcut_balanced"] is None  # the shortcut says "Yes" on every item: one label, not measurable

    # the same FT cell compared with itself is "no clear difference"
    same = build_summary(["relation"], icl, ft, "m", "test", Comparison(shots=0, n_train=16))
    d = same["tasks"]["relation"]["comparison"]["icl_minus_ft"]
    # no discordant item of 20: Tango's interval is +-z^2 / (20 + z^2)
    assert d["diff"] == 0 and d["p"] == 1.0 and d["ci95"][1] == -d["ci95"][0] == pytest.approx(Z95 ** 2 / (20 + Z95 ** 2))
    assert same["tasks"]["relation"]["verdict"] == "no clear difference"

    report = write_report(tmp_path / "out", [summary]).read_text()
    assert t["comparison"]["p_adjusted"] == diff["p"] and t["comparison"]["family"] == 1  # a family of one
    assert "| relation | 50.0 [" in report and "contradicts" in report and "-50.0 [" in report
    assert "answering `Yes` always scores 100.0" in report and "answer_lora: not defined" in report
    assert "Holm-adjusted over the family of this report's verdicts (1 comparison: its tasks)" in report
    assert (tmp_path / "out" / "plots" / "relation.png").stat().st_size > 1000


def test_mostly_invalid_cell_gives_no_verdict_and_smoke_presets_say_so(tmp_path):
    """An FT model that printed nothing on most items (the quick preset's relation models: 100% invalid)
    used to yield "supports the paper's claim"; now the verdict says why it cannot be judged."""
    silent = lambda split, i: None if i < 15 else "Yes"  # noqa: E731 - 15 of 20 pattern answers unparseable
    half = lambda split, i: "Yes" if i % 2 else "No"  # noqa: E731
    icl = folder(tmp_path / "icl", {("relation/k=4/seed=0", 4, 0): half})
    ft = [FTResult("answer_lora", "lora", ("relation",), 16, 0, folder(tmp_path / "ft", {("relation/k=0", 0, None): silent}))]
    t = build_summary(["relation"], icl, ft, "m", "test", Comparison())["tasks"]["relation"]
    assert t["comparison"]["invalid_flagged"] == {"FT": 0.75} and t["verdict"] == "no verdict (invalid)"
    assert build_summary(["relation"], icl, ft, "m", "test", Comparison(max_invalid=0.8))["tasks"]["relation"][
        "verdict"] != "no verdict (invalid)"  # 75% <= 80%: judged as usual
    summary = build_summary(["relation"], icl, ft, "m", "test", Comparison(), smoke=True)
    report = write_report(tmp_path / "out", [summary]).read_text()
    assert "**Smoke test.**" in report.split("##")[0] and "most answers of a compared cell are unparseable" in report
    assert "no verdict (invalid): FT 75.0% invalid" in report  # the cause, named
    assert summary["tasks"]["relation"]["verdict"] == "no verdict (invalid)" and summary["family"]["size"] == 0
    plain = write_report(tmp_path / "out2", [build_summary(["relation"], icl, ft, "m", "test")]).read_text()
    assert "Smoke test" not in plain


def test_holm_over_every_verdict_of_a_report(tmp_path):
    """Two models in one report (a size sweep): one family. ICL right on 6 more items than FT alone gives
    p = 0.031 (supports at 5%); with a second comparison at p = 1, Holm doubles it: no clear difference."""
    six = lambda split, i: "Yes" if i < 6 else "No"  # noqa: E731
    none = lambda split, i: "No"  # noqa: E731
    icl = folder(tmp_path / "icl", {("relation/k=4/seed=0", 4, 0): six})
    ft = [FTResult("answer_lora", "lora", ("relation",), 16, 0, folder(tmp_path / "ft", {("relation/k=0", 0, None): none}))]
    one = build_summary(["relation"], icl, ft, "m1", "test", Comparison())
    assert one["tasks"]["relation"]["comparison"]["icl_minus_ft"]["p"] == 2 * 0.5 ** 6
    write_report(tmp_path / "a", [one])
    assert one["tasks"]["relation"]["verdict"] == "supports"
    twin = folder(tmp_path / "ft_same", {("relation/k=0", 0, None): six})  # FT answering exactly as ICL: p = 1
    same = build_summary(["relation"], icl, [FTResult("answer_lora", "lora", ("relation",), 16, 0, twin)], "m2", "test")
    two = build_summary(["relation"], icl, ft, "m1", "test", Comparison())
    write_report(tmp_path / "b", [two, same])
    assert two["tasks"]["relation"]["comparison"]["p_adjusted"] == 2 * 2 * 0.5 ** 6
    assert two["tasks"]["relation"]["verdict"] == "no clear difference" and two["family"]["size"] == 2


def test_a_task_the_preset_does_not_fine_tune_says_so_and_is_not_in_the_family(tmp_path):
    half = lambda split, i: "Yes" if i % 2 else "No"  # noqa: E731
    icl = folder(tmp_path / "icl", {("relation/k=4/seed=0", 4, 0): half})
    summary = build_summary(["relation"], icl, [], "m", "test", Comparison())
    report = write_report(tmp_path / "out", [summary]).read_text()
    assert summary["tasks"]["relation"]["verdict"] == "ICL only" and summary["family"]["size"] == 0
    assert "the preset fine-tunes no model on this task" in report


def _stat(mean: float) -> dict:
    return {"mean": mean, "ci95": [max(0.0, mean - 0.1), min(1.0, mean + 0.1)]}


def test_sizes_plot_labels_each_model_once_without_overlap(tmp_path, monkeypatch):
    """sizes.png: one x tick label per model (135M, 630M, 1.5B) and none of them overlap (a log axis over
    about a decade used to label its minor ticks too, on top of each other)."""
    from iclvsft.report import plots

    def summary(model, n_params, acc):
        task = {"icl": [{"k": 4, "pattern": {"accuracy": _stat(acc)}}],
                "ft": [{"protocol": "answer_lora", "n_train": 256, "pattern": {"accuracy": _stat(acc / 2)}}]}
        return {"model": model, "n_params": n_params, "tasks": {"expression": task, "boolean": task}}

    checked = []
    real_save = plots.save_panels

    def save_and_check(fig, axes, path, **kwargs):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in axes[0]:
            labels = [t for t in ax.get_xticklabels(minor=False) + ax.get_xticklabels(minor=True)
                      if t.get_visible() and t.get_text()]
            assert [t.get_text() for t in labels] == ["135M", "630M", "1.5B"]
            boxes = [t.get_window_extent(renderer) for t in labels]
            assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
            checked.append(ax)
        return real_save(fig, axes, path, **kwargs)

    monkeypatch.setattr(plots, "save_panels", save_and_check)
    path = plots.plot_sizes([summary("qwen2.5-coder-1.5b-instruct", 1_543_714_304, 0.8),
                             summary("smollm2-135m-instruct", 134_515_008, 0.3),
                             summary("qwen2.5-coder-0.5b-instruct", 630_167_424, 0.6)], tmp_path)
    assert len(checked) == 2 and Path(path).read_bytes()[:4] == b"\x89PNG"


def test_report_and_table_name_the_prompt_style_and_format_that_ran(tmp_path):
    """report.md and each evaluation's table.md say which prompt style and format ran (not only the
    defaults: a chat-style run with the authors' format says so)."""
    from iclvsft.evaluate import render_table

    half = lambda split, i: "Yes" if i % 2 else "No"  # noqa: E731
    icl = folder(tmp_path / "icl", {("relation/k=4/seed=0", 4, 0): half})
    summary = build_summary(["relation"], icl, [], "m", "test", prompt_style="chat", prompt_format="authors")
    report = write_report(tmp_path / "out", [summary]).read_text()
    assert "the model's chat template" in report and "(`prompt_style: chat`), format `authors`" in report
    identity = {"model": "m", "adapter": None, "format": "authors", "prompt_style": "chat", "dtype": "float32",
                "attn_implementation": "sdpa", "data_seed": 0, "demo_mode": "fixed"}
    table = render_table({"identity": identity, "provenance": {"git_commit": None, "versions": {}}, "by_condition": []})
    assert "prompt format authors, prompt style chat, dtype float32" in table


def test_report_names_the_precision_each_side_ran_in(tmp_path):
    """`dtype: auto` resolves per machine (bf16 on a CPU with native bf16, else fp32), so report.md says
    what the run's folders recorded: the ICL and FT evaluations' dtype and the FT runs' training precision;
    a folder with no record adds nothing, and a report with no record says nothing."""
    half = lambda split, i: "Yes" if i % 2 else "No"  # noqa: E731
    icl = folder(tmp_path / "icl", {("relation/k=4/seed=0", 4, 0): half})
    icl.write_text(json.dumps({"identity": {"dtype": "torch.bfloat16"}}))
    ft = [FTResult("answer_lora", "lora", ("relation",), 16, seed,
                   folder(tmp_path / f"ft{seed}", {("relation/k=0", 0, None): half}),
                   {"precision": {"dtype": dtype, "load_dtype": dtype, "bf16": True, "fp16": False}})
          for seed, dtype in ((0, "bfloat16"), (1, "float32"))]
    ft[0].metrics_path.write_text(json.dumps({"identity": {"dtype": "torch.float32"}}))  # ft[1]'s: no record
    summary = build_summary(["relation"], icl, ft, "m", "test")
    assert summary["precision"] == {"evaluation": ["bfloat16", "float32"], "training": ["bfloat16", "float32"]}
    report = write_report(tmp_path / "out", [summary]).read_text()
    assert "Precision: evaluation in bfloat16 and float32, training in bfloat16 and float32 (" in report

    bare = build_summary(["relation"], folder(tmp_path / "bare", {("relation/k=4/seed=0", 4, 0): half}), [], "m", "t")
    assert bare["precision"] == {"evaluation": [], "training": []}
    assert "Precision:" not in write_report(tmp_path / "out2", [bare]).read_text()
