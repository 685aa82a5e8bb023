"""The authors' format as independent factors (``format_ours``): every factor theirs renders as the
format did before it was split, every factor ours is our format, and each factor alone changes only
its own part of a prompt, answer or budget."""
from __future__ import annotations

import hashlib
import json

import pytest

from iclvsft.config import load_config
from iclvsft.errors import ConfigError
from iclvsft.prompts import build_prompt, completion_text, ft_row
from iclvsft.rng import item_rng
from iclvsft.tasks import FORMAT_FACTORS, Item, get_task, task_in_format
from iclvsft.tasks.formats import FormattedTask, format_name, parse_format, train_format

TASKS = ("expression", "relation", "boolean", "algebra")
ATTRS = ("header", "answer_sep", "answer_end", "multiline", "demo_sep", "answer_format", "max_new_tokens",
         "substring_aliases")


def sample_items(name: str, n: int = 6) -> list[Item]:
    """Items of both distributions and both splits, drawn straight from the generators."""
    task, items = get_task(name), []
    for dist in ("ours", "authors"):
        for split in ("pattern", "control"):
            for i in range(n):
                rng = item_rng(7, "golden", name, dist, split, i)
                d = task.generate_authors(rng, "test", split) if dist == "authors" else task.generate(rng, split)
                items.append(Item(id=f"{name}-{dist}-{split}-{i}", task=name, split=split, question=d.question,
                                  answer=d.answer, shortcut_answer=d.shortcut_answer, meta=d.meta))
    return items


def render(view, items: list[Item], train_rows: bool = True) -> dict:
    """Everything a view decides: its attributes, zero- and 3-shot prompts, completions, FT rows."""
    shown = [view.present(i) for i in items]
    out = {a: getattr(view, a) for a in ATTRS}
    out["prompts0"] = [build_prompt(view, s.question) for s in shown]
    out["prompts3"] = [build_prompt(view, s.question, shown[j + 1:j + 4]) for j, s in enumerate(shown[:8])]
    out["completions"] = [completion_text(view, s.answer) for s in shown]
    out["shortcuts"] = [s.shortcut_answer for s in shown]
    out["rows_prompt"] = [ft_row(view, s) for s in shown]
    if train_rows:
        out["rows_authors"] = [view.train_row(i) for i in items]
    return out


def test_every_factor_theirs_renders_as_before_the_split():
    # sha256 of the same rendering by the code before the format was split into factors (commit 8bb09f5,
    # where `format: authors` was one switch): the authors' setup of the ladder's rung 0 is unchanged
    digest = hashlib.sha256(json.dumps(
        {name: render(task_in_format(get_task(name), "authors"), sample_items(name)) for name in TASKS},
        sort_keys=True, default=str).encode()).hexdigest()
    assert digest == AUTHORS_DIGEST_8BB09F5


AUTHORS_DIGEST_8BB09F5 = "7924c05c8794afc0f3b805ea97b41ed7765e226629b00eb35d0f3a5c0545b212"


@pytest.mark.parametrize("name", TASKS)
def test_every_factor_ours_is_our_format(name):
    task, items = get_task(name), sample_items(name, 10)
    mixed = render(FormattedTask(task, FORMAT_FACTORS), items, train_rows=False)
    assert mixed == render(task, items, train_rows=False)
    assert format_name("authors", FORMAT_FACTORS) == "ours" and task_in_format(task, "ours") is task


# Which parts of a task's rendering each factor alone may change (by hand, from the authors' release):
# q = question text (trailing space aside), a = answer text, sep = the query's trailing space / the answer's
# leading one, end = answer end,
# fmt = strict answer format, budget = token budget, header, layout = demonstration separators.
CHANGES = {
    ("query_space", "expression"): set(), ("query_space", "relation"): {"sep"}, ("query_space", "boolean"): {"sep"},
    ("query_space", "algebra"): {"sep"},
    **{("budget", t): {"budget"} for t in TASKS},
    **{("answer_end", t): {"end"} for t in TASKS},
    ("labels", "expression"): set(), ("labels", "relation"): {"a", "fmt"}, ("labels", "boolean"): {"a", "fmt"},
    ("labels", "algebra"): set(),
    **{("header", t): {"header"} for t in TASKS},
    ("question", "expression"): {"layout"}, ("question", "relation"): {"q", "layout"},
    ("question", "boolean"): {"q", "layout"}, ("question", "algebra"): {"q", "layout"},
    ("giveaway", "expression"): set(), ("giveaway", "relation"): set(), ("giveaway", "boolean"): set(),
    ("giveaway", "algebra"): {"q", "a", "fmt"},
}


def parts_changed(a, b, items: list[Item]) -> set[str]:
    changed = set()
    sa, sb = [a.present(i) for i in items], [b.present(i) for i in items]
    if [s.question.rstrip(" ") for s in sa] != [s.question.rstrip(" ") for s in sb]:
        changed.add("q")
    if [s.answer for s in sa] != [s.answer for s in sb] or [s.shortcut_answer for s in sa] != [
            s.shortcut_answer for s in sb]:
        changed.add("a")
    if a.answer_sep != b.answer_sep or [s.question.endswith(" ") for s in sa] != [s.question.endswith(" ") for s in sb]:
        changed.add("sep")
    pairs = {"end": "answer_end", "fmt": "answer_format", "budget": "max_new_tokens", "header": "header"}
    changed |= {part for part, attr in pairs.items() if getattr(a, attr) != getattr(b, attr)}
    if (a.multiline, a.demo_sep) != (b.multiline, b.demo_sep):
        changed.add("layout")
    return changed


@pytest.mark.parametrize("factor", FORMAT_FACTORS)
@pytest.mark.parametrize("name", TASKS)
def test_each_factor_alone_changes_only_its_part(factor, name):
    task, items = get_task(name), sample_items(name)
    theirs, one = FormattedTask(task), FormattedTask(task, {factor})
    assert parts_changed(theirs, one, items) == CHANGES[factor, name]
    # and the same factor switched last, with every other factor already ours
    rest = set(FORMAT_FACTORS) - {factor}
    assert parts_changed(FormattedTask(task, rest), task, items) == CHANGES[factor, name]


def test_the_factors_by_example():
    rel, item = get_task("relation"), sample_items("relation", 1)[0]
    assert FormattedTask(rel).present(item).question.endswith(" is ")
    spaced = FormattedTask(rel, {"query_space"})
    assert spaced.present(item).question.endswith(" is") and completion_text(spaced, "True") == " True"
    labelled = FormattedTask(rel, {"labels"})
    assert labelled.present(item).answer == item.answer in ("Yes", "No") and labelled.answer_format == "yesno"
    alg, a_item = get_task("algebra"), sample_items("algebra", 1)[0]
    b = str(a_item.meta["b"])
    assert FormattedTask(alg).present(a_item).answer == b
    both = FormattedTask(alg, {"giveaway", "query_space"})
    assert both.present(a_item).question.endswith("The solutions are:") and both.present(a_item).answer == a_item.answer
    assert FormattedTask(get_task("boolean"), {"budget"}).max_new_tokens == 0 == get_task("boolean").max_new_tokens


def test_authors_training_rows_follow_the_factors_their_text_has():
    rel, item = get_task("relation"), sample_items("relation", 1)[0]
    theirs = FormattedTask(rel).train_row(item)
    assert theirs["prompt"].endswith(" is") and theirs["completion"] in (" True", " False")
    assert not theirs["prompt"].startswith(FormattedTask(rel).header)  # their rows have no header
    # the factors their training text does not have leave it alone; the others change it
    for factor in FORMAT_FACTORS:
        row = FormattedTask(rel, {factor}).train_row(item)
        assert (row != theirs) == (factor in ("answer_end", "labels", "question")), factor
    assert FormattedTask(rel, {"labels", "answer_end"}).train_row(item)["completion"] == f" {item.answer}\n"
    expr = sample_items("expression", 1)[0]
    assert FormattedTask(get_task("expression")).train_row(expr)["prompt"].endswith("+=")


def test_format_names_and_training_identity_by_hand():
    assert format_name("authors", ["labels", "query_space"]) == "authors+ours:query_space,labels"
    assert format_name("authors", ["query_space", "budget"]) == "authors+ours:budget,query_space"
    assert parse_format("authors+ours:query_space,labels") == {"query_space", "labels"}
    assert parse_format("ours") is None and parse_format("authors") == frozenset()
    with pytest.raises(ConfigError, match="unknown format"):
        parse_format("authors+ours:labels,query_space")  # not canonical order
    # the identity of the fine-tuned model: only the factors its rows show
    assert train_format("authors", "authors_train") == "authors"
    assert train_format("authors+ours:budget,query_space,header,giveaway", "authors_train") == "authors"
    assert train_format("authors+ours:budget,labels", "authors_train") == "authors+ours:labels"
    assert train_format("ours", "authors_train") == "authors+ours:answer_end,labels,question"
    assert train_format("authors+ours:budget,query_space,answer_end,labels,header,question",
                        "authors_train") == train_format("ours", "authors_train")
    assert train_format("ours", "prompt") == "ours" and train_format("authors", "prompt") == "authors"
    assert train_format("authors+ours:budget", "prompt") == "authors"
    assert train_format("authors+ours:query_space,answer_end,labels,header,question,giveaway", "prompt") == "ours"


def test_format_ours_in_the_config():
    ok = load_config(None, ["format=authors", "format_ours=[labels,budget]", "data.tasks=[relation,algebra]"])
    assert ok.prompt_format == "authors+ours:budget,labels"
    assert load_config(None, []).prompt_format == "ours"
    with pytest.raises(ConfigError, match="needs format: authors"):
        load_config(None, ["format_ours=[labels]"])
    with pytest.raises(ConfigError, match="unknown format_ours"):
        load_config(None, ["format=authors", "format_ours=[colour]", "data.tasks=[relation]"])
    with pytest.raises(ConfigError, match="repeats"):
        load_config(None, ["format=authors", "format_ours=[labels,labels]", "data.tasks=[relation]"])
