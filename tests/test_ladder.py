"""The ladder from the authors' setup to ours: the authors' formats, the substring scorer, the ICL
cell selection, folder sharing between rungs, and a small ladder end to end on the tiny model."""
import json

import pytest
import yaml

from iclvsft.config import load_config
from iclvsft.errors import ConfigError
from iclvsft.fit import Runners
from iclvsft.jobs import plan_ladder
from iclvsft.prompts import build_prompt, completion_text
from iclvsft.report.ladder import rung_task, select_icl
from iclvsft.report.summary import judge
from iclvsft.scoring import score, substring_match
from iclvsft.tasks import FORMAT_FACTORS, Item, get_task, task_in_format
from iclvsft.train import select_rows

TASKS = ["expression", "relation", "boolean", "algebra"]


def _item(task, split="pattern", index=0):
    return get_task(task).make_item(0, "test", split, index)


# --- the authors' formats, checked against the examples in their release ------------------------

def test_expression_authors_rows_use_their_older_format():
    task = task_in_format(get_task("expression"), "authors")
    item = Item("x", "expression", "pattern", "(0+2)+(3+0-3)*(-3+1-9+4)=", "2", "2", {})
    assert task.train_row(item) == {"prompt": "(0+2)+(3+0-3)*(-3+1-9+4)+=", "completion": "2"}
    assert build_prompt(task, task.present(item).question) == (
        "Now you need to calculate the answer of some mathematic equations. Here are some examples: \n"
        "(0+2)+(3+0-3)*(-3+1-9+4)=")
    assert completion_text(task, "2") == "2" and task.max_new_tokens == 3


def test_relation_boolean_algebra_authors_text():
    rel = task_in_format(get_task("relation"), "authors")
    item = Item("r", "relation", "control", "B is connected with A.\nZ is connected with C.\nAre A and Z connected?",
                "No", "Yes", {})
    shown = rel.present(item)
    assert shown.question == "B is connected with A\nZ is connected with C\n\n So 'the city A and Z is connected' is "
    assert (shown.answer, shown.shortcut_answer, shown.id, shown.split) == ("False", "True", "r", "control")
    assert rel.train_row(item)["completion"] == " False" and rel.max_new_tokens == 2

    boo = task_in_format(get_task("boolean"), "authors")
    item = Item("b", "boolean", "pattern", "((True) or (False)) and False =", "False", "False", {})
    assert boo.present(item).question == "((True) or (False)) and False\n The result is: "  # 1 token: the digit
    assert boo.present(item).answer == "0" and boo.train_row(item) == {
        "prompt": "((True) or (False)) and False\n The result is:", "completion": " 0"}

    alg = task_in_format(get_task("algebra"), "authors")
    item = _item("algebra")
    a, b = item.meta["a"], item.meta["b"]
    lines = [f"{p}a + {q}b = {r}" for p, q, r in item.meta["equations"]]
    assert alg.present(item).question == "\n".join(lines) + f"\n The solutions are: a = {a}, b = "
    assert alg.present(item).answer == str(b)
    assert alg.train_row(item) == {"prompt": "\n".join(lines) + "\n The solutions are:",
                                   "completion": f" a = {a}, b = {b}"}
    # the equations written by the authors' route hold for the item's solution (a second route)
    assert all(p * a + q * b == r for p, q, r in item.meta["equations"])


def test_authors_answers_are_the_gold_answers_in_their_labels():
    """Every presented item's gold is the original gold mapped to their label set (second route)."""
    mapping = {"relation": {"Yes": "True", "No": "False"}, "boolean": {"True": "1", "False": "0"}}
    for name in TASKS:
        task = task_in_format(get_task(name), "authors")
        for split in task.splits:
            for n in range(20):
                item = _item(name, split, n)
                shown = task.present(item)
                expected = (str(item.meta["b"]) if name == "algebra" else mapping.get(name, {}).get(item.answer, item.answer))
                assert shown.answer == expected
                assert score(shown, " " + shown.answer, task.answer_format).correct


def test_format_authors_is_refused_for_tasks_they_did_not_have():
    with pytest.raises(ConfigError, match="no authors' format"):
        load_config(None, ["format=authors"])  # data.tasks includes code and parity
    with pytest.raises(ConfigError, match="needs format: authors"):
        load_config(None, ["ft.rows=authors_train"])


def test_ft_rows_follow_the_format(small_data):
    data = small_data
    ours, _ = select_rows(data, ["expression"], 2)
    theirs, _ = select_rows(data, ["expression"], 2, fmt="authors", row_text="authors_train")
    matched, _ = select_rows(data, ["boolean"], 2, fmt="authors")
    assert ours[0]["prompt"].startswith("Compute the value") and ours[0]["completion"].endswith("\n")
    assert theirs[0]["prompt"].endswith("+=") and "\n" not in theirs[0]["prompt"]
    assert matched[0]["prompt"].startswith("Here are some boolean expressions") and matched[0]["prompt"].endswith(": ")
    assert matched[0]["completion"] in ("1", "0")


# --- scoring and selection, by hand ---------------------------------------------------------------

def test_substring_scoring_is_the_authors():
    assert substring_match("1", "10")  # their defect, reproduced on purpose
    assert substring_match("True", " 1\n", ("1",)) and not substring_match("True", " 0", ("1",))
    assert substring_match(None, "x") is None and not substring_match("7", " 8")


def _row(task, k, split, correct, seed=0, item=0, substring=None):
    return {"task": task, "k": k, "demo_seed": seed, "split": split, "item_id": f"{split}{item}", "correct": correct,
            "substring_correct": correct if substring is None else substring, "answer": "1", "shortcut_answer": "1",
            "strict": "1" if correct else "0", "lenient_correct": correct, "lenient": None, "invalid": False,
            "shortcut": correct, "substring_shortcut": correct, "constrained_correct": None, "constrained_shortcut": None}


def test_select_icl_takes_the_best_k_or_the_fixed_one():
    # pattern accuracy: k=1 2/4, k=2 3/4, k=4 3/4 (tie: the smaller k), k=8 1/4
    scores = {1: [1, 1, 0, 0], 2: [1, 1, 1, 0], 4: [0, 1, 1, 1], 8: [0, 0, 0, 1]}
    by_k = {k: [[_row("t", k, "pattern", bool(c), item=n) for n, c in enumerate(v)]] for k, v in scores.items()}
    assert select_icl(by_k, "max", 16, "correct") == 2
    assert select_icl(by_k, "fixed", 8, "correct") == 8 and select_icl(by_k, "fixed", 16, "correct") is None


def test_rung_numbers_by_hand():
    """ICL right on 8 of 8 pattern items only by substring, FT right on all: substring reads ICL 8/8 (a
    paired difference of 0), strict reads ICL 0/8 vs FT 8/8 (-100, McNemar p = 2 / 2^8). Both are shown;
    the verdict is strict's, the study's rule."""
    icl = [_row("t", 4, "pattern", False, item=n, substring=True) for n in range(8)]
    ft = [{**_row("t", 0, "pattern", True, item=n), "demo_seed": None, "completion": " 1"} for n in range(8)]
    rung = rung_task("t", icl, [ft], "max", 16)
    assert rung["k"] == 4 and rung["substring"]["icl"]["pattern"]["mean"] == 1.0
    assert rung["strict"]["icl"]["pattern"]["mean"] == 0.0 and rung["icl"] == rung["strict"]["icl"]
    assert rung["icl_minus_ft"]["diff"] == -1.0 and rung["icl_minus_ft"]["p"] == 2 / 2 ** 8
    assert rung["verdict"] == "contradicts"
    assert rung["ft_completions"] == {"n": 8, "top": [[" 1", 8]]}
    # 4 items only: McNemar p = 0.125, no verdict either way
    assert rung_task("t", icl[:4], [ft[:4]], "max", 16)["verdict"] == "no clear difference"


def test_train_seeds_are_pooled_like_the_study():
    """Two FT seeds, each right on 4 of 8 items (different ones): pooled 50%, and the paired difference uses
    each item's mean over the seeds."""
    icl = [_row("t", 4, "pattern", True, item=n) for n in range(8)]
    seeds = [[{**_row("t", 0, "pattern", (n + s) % 2 == 0, item=n), "demo_seed": None, "completion": "x"}
              for n in range(8)] for s in range(2)]
    rung = rung_task("t", icl, seeds, "fixed", 4)
    assert rung["ft_seeds"] == 2 and rung["ft"]["pattern"]["mean"] == 0.5
    assert rung["icl_minus_ft"]["diff"] == 0.5 and rung["ft_completions"]["n"] == 16


def test_a_rung_whose_fine_tuned_model_is_mostly_invalid_gives_no_verdict():
    """The old ladder's rungs 1-3: FT never ends its answer, every completion unparseable under the
    strict parse, yet substring scoring counts it right. Under the study's max_invalid rule: no verdict;
    substring is still shown beside it."""
    icl = [_row("t", 4, "pattern", n < 2, item=n) for n in range(8)]
    ft = [{**_row("t", 0, "pattern", False, item=n, substring=True), "demo_seed": None, "invalid": True,
           "strict": None, "completion": "1111"} for n in range(8)]
    rung = rung_task("t", icl, [ft], "max", 16, max_invalid=0.5)
    assert rung["ft"]["invalid"]["mean"] == 1.0 and rung["invalid_flagged"] == {"FT": 1.0}
    assert rung["substring"]["ft"]["pattern"]["mean"] == 1.0 and rung["ft_completions"]["top"] == [["1111", 8]]
    assert rung["verdict"] == "no verdict (invalid)"
    assert judge([rung]) == 0 and rung["verdict"] == "no verdict (invalid)"  # not in the family either
    # without the rule, strict reads ICL 2/8 vs FT 0/8: 2 discordant items, no clear difference
    assert rung_task("t", icl, [ft], "max", 16, max_invalid=1.0)["verdict"] == "no clear difference"


# --- the preset and the runner ----------------------------------------------------------------------

def test_ladder_preset_plans_one_factor_per_rung(root, tmp_path):
    config = load_config(root / "configs" / "ladder.yaml")
    every = plan_ladder(config, tmp_path)
    others = [r for r in every if r.config.model != config.model]  # rung 0 again on other models, right after it
    assert [(r.index, r.config.model) for r in others] == [(0, m) for m in config.ladder.first_rung_models]
    assert every[1:1 + len(others)] == others and all(r.config.ft == every[0].config.ft for r in others)
    assert len({r.icl_dir for r in every[:1 + len(others)]}) == 1 + len(others)  # their own folders
    rungs = [r for r in every if r.config.model == config.model]
    first, last = rungs[0].config, rungs[-1].config
    # rung 0: the authors' data, formats and training, exactly (100 steps, 20 warm-up, 16 rows, per-row loss)
    assert (first.data.distribution, first.format, first.ft.rows, first.ft.method) == ("authors", "authors",
                                                                                        "authors_train", "full")
    assert (first.ft.max_steps, first.ft.warmup_steps, first.ft.batch_size, first.ft.loss_average,
            first.ft.loss_on, first.ft.append_eos) == (100, 20, 16, "rows", "sequence", False)
    assert rungs[0].data_name == "authors" and all(not r.data_name for r in rungs[1:])
    assert [len(r.ft) for r in rungs] == [3] + [1] * 12 + [4] * 4 + [12]  # 3 seeds at the first and the last rung
    # each rung after the first changes one factor: one key (the train seeds ride along where they change),
    # or one more factor of the format shown our way; no rung sets a key back to an earlier rung's value
    for before, r in zip(rungs, rungs[1:]):
        keys = set(r.changes) - {"ladder.train_seeds"}
        if keys == {"format_ours"}:
            assert len(r.config.format_ours) == len(before.config.format_ours) + 1, r.name
            assert set(before.config.format_ours) < set(r.config.format_ours), r.name
        elif r.name == "FT rows = the evaluation prompt":  # format keys rewritten, the same format
            assert keys == {"ft.rows", "format", "format_ours"}
            assert r.config.prompt_format == before.config.prompt_format == "ours"
        else:
            assert len(keys) == 1 or r.name in ("our optimisation (answer-only LoRA)",
                                                "the main study's cells and seeds"), r.name
    assert [f for f in rungs[-1].config.format_ours] == [] and rungs[-1].config.prompt_format == "ours"
    # every factor of the authors' format gets a rung of its own
    assert {f for r in rungs for f in r.config.format_ours} == set(FORMAT_FACTORS)
    # a rung that changes only how an item is shown or ICL is read reuses the fine-tuned models and
    # evaluates them again (its own ft_eval folders)
    for name in ("no trailing space after the query", "our token budget", "our headers", "algebra asks for a and b",
                 "ICL at a fixed k"):
        rung = next(r for r in rungs if r.name == name)
        before = rungs[rung.index - 1]
        assert [f.ft_dir for f in rung.ft] == [f.ft_dir for f in before.ft], name
        if name != "ICL at a fixed k":
            assert rung.icl_dir != before.icl_dir and [f.eval_dir for f in rung.ft] != [f.eval_dir for f in before.ft]
    fixed = next(r for r in rungs if r.name == "ICL at a fixed k")
    assert fixed.icl_dir == rungs[fixed.index - 1].icl_dir
    # the last rung is configs/cpu.yaml's protocol
    cpu = load_config(root / "configs" / "cpu.yaml")
    for key in ("method", "loss_on", "append_eos", "loss_average", "n_train", "epochs", "learning_rate",
                "lr_scheduler", "warmup_steps", "max_steps", "batch_size", "rows"):
        assert getattr(last.ft, key) == getattr(cpu.ft, key) or (key, getattr(last.ft, key)) == ("n_train", 256), key
    assert (last.prompt_format, last.data.distribution, last.eval.demo_mode, last.eval.shots, last.eval.demo_seeds) == (
        cpu.prompt_format, cpu.data.distribution, cpu.eval.demo_mode, cpu.eval.shots, cpu.eval.demo_seeds)
    assert last.ladder.icl_select == "fixed" and last.ladder.fixed_k == cpu.reproduce.compare_shots
    assert last.ladder.train_seeds == cpu.reproduce.compare_train_seeds and last.ft.tasks == []


def test_bad_rung_key_fails_at_load(root, tmp_path):
    config = yaml.safe_load((root / "configs" / "ladder.yaml").read_text())
    config["ladder"]["rungs"][1]["set"] = {"ft.learnig_rate": 1}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="learnig_rate"):
        plan_ladder(load_config(path), tmp_path)


def _small_ladder(root, tmp_path):
    """The preset on the tiny model, every rung, a few items and steps."""
    config = yaml.safe_load((root / "configs" / "ladder.yaml").read_text())
    config.update(model="tiny-random-qwen2", name="ladder_small")
    config["ladder"]["first_rung_models"] = ["tiny-random-qwen2"]  # the path runs; the same model shares rung 0's folders
    config["data"].update(train_pattern=40, test_pattern=3, test_control=3)
    config["eval"].update(limit=3, shots=[1, 2], batch_size=4)
    config["ladder"]["fixed_k"] = 2
    for rung in config["ladder"]["rungs"]:
        s = rung["set"]
        for key, small in (("ft.n_train", 8), ("ft.max_steps", 2), ("ft.warmup_steps", 1)):
            if key in s and s[key]:
                s[key] = small
        if "ft.epochs" in s:
            s["ft.max_steps"] = 2
        if "eval.shots" in s:
            s["eval.shots"] = [0, 2]
        s["ft.per_device_batch_size"] = s["ft.batch_size"] = 4
    path = tmp_path / "ladder_small.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_small_ladder_end_to_end_and_resume(root, tmp_path):
    from iclvsft.study import run_study

    config = load_config(_small_ladder(root, tmp_path))
    report = run_study(config, tmp_path / "data", tmp_path / "r", show_progress=False)
    text = report.read_text()
    assert "## From the authors' setup to ours" in text and "![ladder](plots/ladder.png)" in text
    assert (tmp_path / "r" / "plots" / "ladder.png").is_file()
    summary = json.loads((tmp_path / "r" / "ladder" / "ladder.json").read_text())
    assert len(summary["rungs"]) == 19 and all(set(r["tasks"]) == set(TASKS) for r in summary["rungs"])
    assert all(t["ft"] is not None and t["icl"] is not None for r in summary["rungs"] for t in r["tasks"].values())
    assert all(t["substring"]["ft"] is not None and t["ft_completions"]["n"] > 0
               for r in summary["rungs"] for t in r["tasks"].values())
    assert [r["tasks"]["expression"]["ft_seeds"] for r in summary["rungs"]][::18] == [3, 3]
    assert summary["rungs"][1]["name"] == "the authors' setup on tiny-random-qwen2"
    # rung 0 evaluated the authors' prompts and FT rows on their data (its own folder beside --data)
    rows0 = [json.loads(line) for line in (tmp_path / "r" / "ladder" / "rung0" / "icl" / "samples.jsonl").open()]
    assert {r["answer"] for r in rows0 if r["task"] == "boolean"} <= {"1", "0"}
    manifest = json.loads((tmp_path / "data-authors" / "manifest.json").read_text())
    assert manifest["data_config"]["distribution"] == "authors"
    from iclvsft.evaluate.evaluator import prompt_sha
    from iclvsft.evaluate.samples import rebuild_prompt

    assert all(prompt_sha(rebuild_prompt(r, tmp_path / "data-authors")) == r["prompt_sha256"] for r in rows0)
    assert not (tmp_path / "r" / "ladder" / "rung16").exists()  # reading ICL at a fixed k computed nothing
    # a second run recomputes nothing and writes the same report
    again = run_study(config, tmp_path / "data", tmp_path / "r", show_progress=False,
                      runners=Runners(finetune=lambda *a, **k: pytest.fail("retrained a finished rung")))
    assert again.read_text() == text


def test_first_rung_seeds_apply_to_the_other_models_only(root, tmp_path):
    config = load_config(root / "configs" / "ladder.yaml", ["ladder.first_rung_seeds=[0]"])
    every = plan_ladder(config, tmp_path)
    first, others = every[0], [r for r in every if r.config.model != config.model]
    assert [f.seed for f in first.ft] == [0, 1, 2] and others
    assert all([f.seed for f in r.ft] == [0] for r in others)
    assert [f.seed for f in plan_ladder(load_config(root / "configs" / "ladder.yaml"), tmp_path)[1].ft] == [0, 1, 2]
