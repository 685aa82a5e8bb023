"""The code task (docs/data.md) and its sandbox: answers confirmed by running the programs, split
invariants, determinism, config validation, and the sandbox's refusals and limits."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from iclvsft import sandbox
from iclvsft.config import load_config
from iclvsft.data import generate, is_up_to_date, sandbox_statement
from iclvsft.errors import ConfigError
from iclvsft.sandbox import SandboxResult, containment, run_programs
from iclvsft.tasks.base import Item
from iclvsft.tasks.code import CONTROL_SHAPES, FUNCTION1_SHAPES, OPS, CodeConfig, CodeTask, apply_op, verify_items

N_PER_SPLIT = 1200


@pytest.fixture(scope="module")
def task() -> CodeTask:
    return CodeTask()


@pytest.fixture(scope="module")
def items(task) -> dict[str, list[Item]]:
    return {split: [task.make_item(7, "train", split, i) for i in range(N_PER_SPLIT)] for split in task.splits}


@pytest.fixture(scope="module")
def sandbox_results(items) -> dict[str, list[SandboxResult]]:
    """One batched sandbox run over every generated program."""
    flat = [item for split in ("pattern", "control") for item in items[split]]
    results = run_programs([item.question for item in flat], timeout_s=1.0)
    return {item.id: result for item, result in zip(flat, results)}


def test_every_answer_is_what_the_program_prints(items, sandbox_results):
    for split in ("pattern", "control"):
        for item in items[split]:
            result = sandbox_results[item.id]
            assert result.error is None, (item.question, result)
            assert result.stdout == item.answer + "\n", (item.question, item.answer, result)


def test_verify_items_confirms_and_catches_a_wrong_answer(task, items):
    sample = items["pattern"][:20] + items["control"][:20]
    assert task.verify(sample) == []
    wrong = Item(**{**sample[3].to_dict(), "answer": str(int(sample[3].answer) + 1)})
    assert verify_items([sample[0], wrong, sample[5]]) == [wrong.id]


def test_split_invariants(items):
    for item in items["pattern"]:
        assert item.shortcut_answer == item.answer
    for item in items["control"]:
        assert item.shortcut_answer != item.answer
    for split in ("pattern", "control"):
        for item in items[split]:
            assert str(int(item.answer)) == item.answer and str(int(item.shortcut_answer)) == item.shortcut_answer
            meta = item.meta
            assert item.shortcut_answer == str(apply_op(meta["op"], meta["v"], meta["k"]))


def test_surface_form_and_layout(items):
    for split in ("pattern", "control"):
        for item in items[split]:
            lines = item.question.split("\n")
            assert 7 <= len(lines) <= 14
            assert lines[0] == "def function1(x):" and "def function2(z, a):" in lines
            v = item.meta["v"]
            assert lines[-2] == f"print(function2({v}, function1({v})))"
            assert lines[-1] == "# Output:"
            assert "" not in lines and not item.question.endswith(" ")
            body2 = "\n".join(lines[lines.index("def function2(z, a):") + 1:-2])
            assert f"{item.meta['op']} {item.meta['k']}" in body2
            assert (" a" in body2) == (split == "control")  # pattern ignores a, control uses it


def test_meta_and_variety(items):
    pattern, control = items["pattern"], items["control"]
    for item in pattern + control:
        meta = item.meta
        assert {"seed", "pool", "index", "v", "op", "k", "function1_shape", "function1_params", "function1_value",
                "function2_shape", "function2_params", "attempts"} <= set(meta)
        assert 0 <= meta["v"] <= 10 and 1 <= meta["k"] <= 9 and abs(meta["function1_value"]) <= 10_000
    assert set(Counter(i.meta["function1_shape"] for i in pattern + control)) == set(FUNCTION1_SHAPES)
    assert set(Counter(i.meta["function2_shape"] for i in control)) == set(CONTROL_SHAPES)
    assert {i.meta["function2_shape"] for i in pattern} == {"ignore_a"}
    assert set(Counter(i.meta["op"] for i in pattern)) == set(OPS)
    for split in ("pattern", "control"):  # duplicates are rare (the data layer drops the few there are)
        assert len({i.question for i in items[split]}) >= 0.98 * N_PER_SPLIT
        assert len({i.answer for i in items[split]}) >= 10


def test_determinism(task, items):
    for split in ("pattern", "control"):
        for i in (0, 1, 517):
            assert task.make_item(7, "train", split, i) == items[split][i]
        other_seed = [task.make_item(8, "train", split, i).question for i in range(50)]
        other_pool = [task.make_item(7, "test", split, i).question for i in range(50)]
        mine = [item.question for item in items[split][:50]]
        assert sum(a != b for a, b in zip(mine, other_seed)) >= 45
        assert sum(a != b for a, b in zip(mine, other_pool)) >= 45


def test_config_restricts_generation():
    task = CodeTask({"ops": ["//"], "k_range": [2, 3], "function1_shapes": ["while"],
                     "control_shapes": ["diff"], "input_range": [-5, 5]})
    made = [task.make_item(1, "test", split, i) for split in ("pattern", "control") for i in range(100)]
    assert {i.meta["op"] for i in made} == {"//"} and {i.meta["function1_shape"] for i in made} == {"while"}
    assert {i.meta["function2_shape"] for i in made} == {"ignore_a", "diff"}
    assert all(-5 <= i.meta["v"] <= 5 and 2 <= i.meta["k"] <= 3 for i in made)
    assert verify_items(made) == []


@pytest.mark.parametrize("values", [
    {"input_range": (5, 1)}, {"input_range": (0, 1000)}, {"input_range": (0,)}, {"input_range": (0.5, 3)},
    {"k_range": (0, 9)}, {"k_range": (1, 100)},
    {"ops": ()}, {"ops": ("+", "%")}, {"ops": "+"}, {"ops": ("+", "+")},
    {"function1_shapes": ()}, {"function1_shapes": ("recursion",)},
    {"control_shapes": ("ignore_a",)}, {"control_shapes": []},
    {"max_abs_value": 10}, {"max_abs_value": "big"}, {"max_abs_value": True},
])
def test_bad_config_values_raise(values):
    with pytest.raises(ConfigError):
        CodeConfig(**values).validate()
    with pytest.raises(ConfigError):
        CodeTask(dict(values))


def test_config_from_dict():
    with pytest.raises(ConfigError, match="unknown key"):
        CodeConfig.from_dict({"input_range": [0, 10], "no_such_key": 1})
    config = CodeConfig.from_dict({"ops": ["+", "-"], "input_range": [1, 4]})
    assert config.ops == ("+", "-") and config.input_range == (1, 4)
    assert CodeConfig.from_dict(config.to_dict()) == config


def test_sandbox_refuses_and_limits_but_runs_the_rest():
    programs = [
        "print(6 * 7)",
        "open('/etc/hostname')",                              # no open in the builtins
        "len.__self__.open('/etc/hostname')",                 # builtins via __self__: the source check refuses
        "import socket",
        "import os\nos.system('echo hi')",
        "len.__self__.__import__('posix').system('echo hi')",  # already-loaded module: the source check refuses
        "while True:\n    pass",
        "print(1 // 0)",
        "x = [0] * 10 ** 10",                                  # address-space limit
        "print('still here')",
    ]
    results = run_programs(programs, timeout_s=0.3)
    assert len(results) == len(programs)
    assert results[0] == SandboxResult("42\n", None)
    assert results[1].error.startswith("NameError")
    assert results[2].error == "RuntimeError: sandbox: attribute '__self__' is not allowed"
    assert results[3].error.startswith("ImportError") and results[4].error.startswith("ImportError")
    assert results[5].error == "RuntimeError: sandbox: attribute '__import__' is not allowed"
    assert results[6].error.startswith("TimeoutError")
    assert results[7].error.startswith("ZeroDivisionError")
    assert results[8].error.startswith("MemoryError")
    assert results[9] == SandboxResult("still here\n", None)
    assert all(r.stdout == "" for r in results[1:9])


def test_sandbox_kills_a_program_that_ignores_its_time_limit():
    # The program is stuck in one C call, where its SIGALRM timer cannot interrupt it: the parent's
    # watchdog kills the child and a fresh child runs the rest of the batch.
    programs = ["print(1)", "sum(range(10 ** 13))", "print(2)"]
    results = run_programs(programs, timeout_s=0.2, kill_grace_s=0.3)
    assert results[0].stdout == "1\n" and results[2] == SandboxResult("2\n", None)
    assert results[1].error.startswith("TimeoutError") and "killed" in results[1].error


def test_sandbox_total_time_limit():
    results = run_programs(["while True:\n    pass"] * 3 + ["print(5)"], timeout_s=0.2, total_timeout_s=0.5)
    assert len(results) == 4 and all(r.error and r.error.startswith("TimeoutError") for r in results)


SIZES = {"tasks": ["code"], "train_pattern": 12, "train_control": 4, "test_pattern": 4, "test_control": 4}


def test_data_refuses_a_degraded_sandbox_unless_allowed_and_records_its_layers(monkeypatch, tmp_path):
    """A sandbox layer that cannot be set up (simulated: the namespace probe fails) stops the code task's
    data with one line naming the key that allows it; allowed, the manifest records the layers."""
    simulated = "namespaces (unshare refused: simulated by the test)"
    monkeypatch.setattr(sandbox, "_launcher", lambda: ([], [], [simulated]))
    with pytest.raises(ConfigError) as refused:
        generate(load_config(overrides=[{"data": SIZES}]), tmp_path / "refused", show_progress=False)
    assert "\n" not in str(refused.value) and "data.sandbox_degraded_ok" in str(refused.value)
    assert not (tmp_path / "refused" / "manifest.json").exists()

    allowed = load_config(overrides=[{"data": {**SIZES, "sandbox_degraded_ok": True}}])
    manifest = generate(allowed, tmp_path / "degraded", show_progress=False)
    layers = manifest["tasks"]["code"]["sandbox"]
    assert layers["missing"] == [simulated] and layers["degraded_ok"] is True
    assert any(a.startswith("seccomp") for a in layers["active"])
    assert not any(a.startswith("namespaces") for a in layers["active"])
    assert json.loads((tmp_path / "degraded" / "manifest.json").read_text())["tasks"]["code"]["sandbox"] == layers
    assert simulated in sandbox_statement(manifest) and "data.sandbox_degraded_ok" in sandbox_statement(manifest)
    assert is_up_to_date(allowed, tmp_path / "degraded")
    assert not is_up_to_date(load_config(overrides=[{"data": SIZES}]), tmp_path / "degraded")

    monkeypatch.undo()
    if containment(refresh=True).missing:
        pytest.skip(f"this machine lacks OS layers: {containment().missing}")
    manifest = generate(load_config(overrides=[{"data": SIZES}]), tmp_path / "full", show_progress=False)
    assert manifest["tasks"]["code"]["sandbox"]["missing"] == [] and "missing" not in sandbox_statement(manifest)
