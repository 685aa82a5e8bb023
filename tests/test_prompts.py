"""One template per task: ICL demonstrations, FT rows and zero-shot queries agree exactly."""
import pytest

from iclvsft.prompts import build_prompt, completion_text, demonstration, ft_row, prefix
from iclvsft.tasks import TASKS, get_task


@pytest.mark.parametrize("name", list(TASKS))
def test_template_is_shared(name):
    task = get_task(name)
    demos = [task.make_item(0, "train", "pattern", i) for i in range(3)]
    query = task.make_item(0, "test", task.splits[-1], 0)
    icl = build_prompt(task, query.question, demos)
    zero = build_prompt(task, query.question)
    assert zero == f"{task.header}\n{query.question}"
    assert icl == prefix(task, demos) + query.question and icl.startswith(task.header + "\n")
    # A demonstration is exactly what a perfect model would produce after the zero-shot prompt.
    for d in demos:
        row = ft_row(task, d)
        assert row["prompt"] + row["completion"] == f"{task.header}\n" + demonstration(task, d) + "\n"
        assert demonstration(task, d) in icl
    assert not zero.endswith(" ")  # the answer separator lives in the completion
    assert completion_text(task, "X").endswith("X\n")


def test_expression_layout_matches_the_authors():
    task = get_task("expression")
    d = task.make_item(0, "train", "pattern", 0)
    assert demonstration(task, d) == d.question + d.answer  # "(1+6)+(-3+3)*(-1-3+9-5)=7"
    assert prefix(task, [d, d]).count("\n") == 3


def test_multiline_tasks_separate_demonstrations_with_a_blank_line():
    task = get_task("relation")
    demos = [task.make_item(0, "train", "pattern", i) for i in range(2)]
    assert "\n\n" in prefix(task, demos)
