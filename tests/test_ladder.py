"""The ladder from the authors' setup to ours: the authors' formats, the substring scorer, the ICL
cell selection, folder sharing between rungs, and a small ladder end to end on the tiny model."""
import json

import pytest
import yaml

from iclvsft.config import load_config
from iclvsft.errors import ConfigError
from iclvsft.ladder import plan_ladder
from iclvsft.prompts import build_prompt, completion_text
from iclvsft.report.ladder import rung_task, select_icl
from iclvsft.report.summary import judge
from iclvsft.scoring import score, substring_match
from iclvsft.tasks import Item, get_task, task_in_format
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
    """ICL right on 8 of 8 pattern items only by substring, FT right on all: under substring scoring
    the paired difference is 0; under strict, ICL 0/8 vs FT 8/8 (-100, McNemar p = 2 / 2^8)."""
    icl = [_row("t", 4, "pattern", False, item=n, substring=True) for n in range(8)]
    ft = [_row("t", 0, "pattern", True, item=n) for n in range(8)]
    for r in ft:
        r["demo_seed"] = None
    sub = rung_task("t", icl, ft, "substring", "max", 16)
    strict = rung_task("t", icl, ft, "strict", "max", 16)
    assert sub["k"] == 4 and sub["icl"]["pattern"]["mean"] == 1.0 and sub["icl_minus_ft"]["diff"] == 0.0
    assert strict["icl"]["pattern"]["mean"] == 0.0 and strict["icl_minus_ft"]["diff"] == -1.0
    assert strict["icl_minus_ft"]["p"] == 2 / 2 ** 8
    assert strict["verdict"] == "contradicts" and sub["verdict"] == "no clear difference"
    # 4 items only: McNemar p = 0.125, no verdict either way
    assert rung_task("t", icl[:4], ft[:4], "strict", "max", 16)["verdict"] == "no clear difference"


def test_a_rung_whose_fine_tuned_model_is_mostly_invalid_gives_no_verdict():
    """The old ladder's rungs 1-3: FT never ends its answer, every completion unparseable under the
    strict parse, yet substring scoring counts it right. Under the study's max_invalid rule: no verdict."""
    icl = [_row("t", 4, "pattern", n < 2, item=n) for n in range(8)]
    ft = [{**_row("t", 0, "pattern", False, item=n, substring=True), "demo_seed": None, "invalid": True,
           "strict": None} for n in range(8)]
    rung = rung_task("t", icl, ft, "substring", "max", 16, max_invalid=0.5)
    assert rung["ft"]["invalid"]["mean"] == 1.0 and rung["invalid_flagged"] == {"FT": 1.0}
    assert rung["verdict"] == "no verdict (invalid)"
    assert judge([rung]) == 0 and rung["verdict"] == "no verdict (invalid)"  # not in the family either
    assert rung_task("t", icl, ft, "substring", "max", 16, max_invalid=1.0)["verdict"] == "contradicts"


# --- the preset and the runner ----------------------------------------------------------------------

def test_ladder_preset_plans_shared_folders(root, tmp_path):
    config = load_config(root / "configs" / "ladder.yaml")
    rungs = plan_ladder(config, tmp_path)
    assert [r.config["format"] for r in rungs][:5] == ["authors"] * 4 + ["ours"]
    assert rungs[0].config["ft"]["rows"] == "authors_train" and rungs[3].config["ft"]["rows"] == "prompt"
    # rungs 1-2 change only how results are read: the same folders as rung 0
    assert rungs[1].icl_dir == rungs[2].icl_dir == rungs[0].icl_dir
    assert rungs[1].ft[0][2] == rungs[2].ft[0][2] == rungs[0].ft[0][2]
    assert rungs[3].icl_dir == rungs[0].icl_dir and rungs[3].ft[0][2] != rungs[0].ft[0][2]
    assert [len(r.ft) for r in rungs] == [1, 1, 1, 1, 1, 1, 4, 4]
    last = rungs[-1].config
    assert (last["ft"]["method"], last["ft"]["loss_on"], last["format"], last["ladder"]["scoring"],
            last["ladder"]["icl_select"]) == ("lora", "completion", "ours", "strict", "fixed")


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
    assert len(summary["rungs"]) == 8 and all(set(r["tasks"]) == set(TASKS) for r in summary["rungs"])
    assert all(t["ft"] is not None and t["icl"] is not None for r in summary["rungs"] for t in r["tasks"].values())
    # rung 0 evaluated the authors' prompts and FT rows; rung 4 ours
    rows0 = [json.loads(line) for line in (tmp_path / "r" / "ladder" / "rung0" / "icl" / "samples.jsonl").open()]
    assert {r["answer"] for r in rows0 if r["task"] == "boolean"} <= {"1", "0"}
    from iclvsft.evaluate.evaluator import prompt_sha
    from iclvsft.evaluate.samples import rebuild_prompt

    assert all(prompt_sha(rebuild_prompt(r, tmp_path / "data")) == r["prompt_sha256"] for r in rows0)
    assert not (tmp_path / "r" / "ladder" / "rung1").exists()  # scoring-only rungs computed nothing
    # a second run recomputes nothing and writes the same report
    again = run_study(config, tmp_path / "data", tmp_path / "r", show_progress=False,
                      finetune_fn=lambda *a, **k: pytest.fail("retrained a finished rung"))
    assert again.read_text() == text
