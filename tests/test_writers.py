"""One writer per results folder, and every input of a result in its identity (issue 23): each test here
failed on the code before the fix."""
import json
import runpy
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from iclvsft.config import load_config
from iclvsft.data import generate
from iclvsft.errors import ConfigError

SMALL = ["data.tasks=[expression]", "data.train_pattern=64", "data.train_control=0", "data.test_pattern=16",
         "data.test_control=8"]
EVAL = ["--model", "tiny-random-qwen2", "--tasks", "expression", "--shots", "0,2", "--demo-seeds", "0",
        "--batch-size", "4", "--quiet"]

# A test.py process that stops once it holds the folder (its first cell about to run) until told to go on:
# the window in which a second writer used to run alongside it.
HELD_TEST_PY = """
import pathlib, runpy, sys, time
from iclvsft.evaluate import run
holding, go = map(pathlib.Path, sys.argv[1:3])
real = run._run_cells
def held(*args, **kwargs):
    holding.write_text("holding")
    deadline = time.monotonic() + 300
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return real(*args, **kwargs)
run._run_cells = held
sys.argv = ["test.py", *sys.argv[3:]]
runpy.run_path("test.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    generate(load_config(None, SMALL), out, show_progress=False)
    return out


def _evaluate(data, out, tiny, model="tiny-random-qwen2"):
    from iclvsft.evaluate import EvalPlan, evaluate

    config = load_config(None, [*SMALL, "model=tiny-random-qwen2", "eval.shots=[0]", "eval.batch_size=4"])
    return evaluate(EvalPlan(config, data, out, model, None), loaded=tiny, show_progress=False)


def test_two_test_py_into_one_folder_one_succeeds_the_other_is_refused(data, tmp_path):
    """Two test.py runs into the same --out at once used to both write it: the second read the rows
    done so far, the first appended the rest, and samples.jsonl ended with each row twice (every n in
    metrics.json doubled). Now the first holds the folder's lock for the whole run; the second exits 2
    at once with one line naming the folder, and the first finishes with each row once."""
    out = tmp_path / "out"
    holding, go = tmp_path / "holding", tmp_path / "go"
    args = ["--data", str(data), "--out", str(out), *EVAL]
    first = subprocess.Popen([sys.executable, "-c", HELD_TEST_PY, str(holding), str(go), *args], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not holding.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holding.exists(), first.communicate()[1][-3000:]
        second = subprocess.run([sys.executable, "test.py", *args], cwd=ROOT, capture_output=True, text=True,
                                timeout=300)
    finally:
        go.write_text("go")
        _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-3000:]
    err = second.stderr.strip()
    assert second.returncode == 2 and len(err.splitlines()) == 1, second.stderr[-3000:]
    assert f"--out {out} is being written by another process" in err
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    keys = [(r["cell"], r["item_id"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * 24  # k=0 and k=2, 16 pattern + 8 control items each
    metrics = json.loads((out / "metrics.json").read_text())
    assert {s: m["n"] for s, m in metrics["cells"]["expression/k=0"]["splits"].items()} == {"pattern": 16,
                                                                                            "control": 8}


def test_a_repeated_row_counts_once(data, tmp_path, tiny):
    """A samples.jsonl holding a row twice (left by two writers before the lock) used to count it twice
    in metrics.json; a row whose (cell, item) is already there is never appended again."""
    out = tmp_path / "out"
    first = _evaluate(data, out, tiny)
    samples = out / "samples.jsonl"
    lines = samples.read_text().splitlines(keepends=True)
    samples.write_text("".join(lines + lines[:5]))  # the whole file again would be the same mistake x2
    (out / "metrics.json").unlink()
    again = _evaluate(data, out, tiny)  # nothing left to compute: metrics.json is rebuilt from the rows
    assert again["cells"] == first["cells"]
    assert again["cells"]["expression/k=0"]["splits"]["pattern"]["n"] == 16
    from iclvsft.evaluate.samples import new_rows, read_samples

    present = {(r["cell"], r["item_id"]) for r in read_samples(samples)}
    assert new_rows([json.loads(line) for line in lines[:3]], present) == []


def test_a_writer_refused_at_start_leaves_no_folder(tmp_path, capsys):
    """The lock creates the folder it guards; a run refused before writing anything (here: no data
    folder) removes it again, with the parents it made."""
    out = tmp_path / "a" / "b" / "out"
    sys.argv, old = ["test.py", "--data", str(tmp_path / "nodata"), "--out", str(out), *EVAL], sys.argv
    try:
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(ROOT / "test.py"), run_name="__main__")
    finally:
        sys.argv = old
    assert exit_.value.code == 2 and "no manifest" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_the_lock_is_re_entrant_and_a_nested_study_stage_locks_its_own_folder(tmp_path):
    from iclvsft.writers import LOCK_FILE, writing

    code = "import sys\nfrom iclvsft.writers import writing\nwith writing(sys.argv[1]):\n    pass\n"

    def other_process(folder):
        return subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)

    results = tmp_path / "results"
    with writing(results):
        with writing(results):  # the command around its library call: the same holder
            (results / "x").write_text("1")
        with writing(results / "icl" / "m"):  # a stage of the study: its own lock
            refused = other_process(results / "icl" / "m")
            assert refused.returncode == 1 and "is being written by another process" in refused.stderr
        assert other_process(results).returncode == 1
    assert other_process(results).returncode == 0
    # icl/m was left empty: removed with the parent its lock made; results holds its lock and x
    assert sorted(p.name for p in results.iterdir()) == [LOCK_FILE, "x"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"), writing(tmp_path / "file"):
        pass


# --- every input of a result in its identity ------------------------------------------------------------

def test_a_tokenizer_changed_in_place_is_another_model(data, tmp_path, tiny):
    """A local model folder's fingerprint covered its weights and config only: a tokenizer or chat
    template edited in place reused the old folder's results. Now a rerun into that folder is refused."""
    folder = tmp_path / "model"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    _evaluate(data, tmp_path / "out", tiny, model=str(folder))
    _evaluate(data, tmp_path / "out", tiny, model=str(folder))  # the same model: reused
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ messages }}"}))
    with pytest.raises(ConfigError, match="holds results of another run .*model_sha256"):
        _evaluate(data, tmp_path / "out", tiny, model=str(folder))


def test_analyze_circuits_refuses_to_replace_a_folder_made_with_other_settings(data, tmp_path, capsys):
    """analyze_circuits.py used to recompute into a finished folder whatever settings made it. Now it
    compares them as reproduce.py does (one comparison, iclvsft.circuits.settings): other settings are
    refused with one line unless --overwrite; the same settings compute it again."""
    out = tmp_path / "circuits"
    common = ["--data", str(data), "--out", str(out), "--model", "tiny-random-qwen2", "--tasks", "expression",
              "--n-items", "3", "--shots", "2", "--bootstrap", "0", "--quiet"]

    def script(*argv):
        sys.argv, old = ["analyze_circuits.py", *common, *argv], sys.argv
        try:
            runpy.run_path(str(ROOT / "analyze_circuits.py"), run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code or 0
        finally:
            sys.argv = old
        return code, capsys.readouterr().err

    assert script()[0] == 0
    made = (out / "circuits.json").read_bytes()
    code, err = script("circuits.seed=1")
    assert code == 2 and len(err.strip().splitlines()) == 1, err[-2000:]
    assert "holds circuit results made with other settings (circuits.seed: 0 -> 1)" in err
    assert "pass --overwrite to start over, or choose another --out" in err
    assert (out / "circuits.json").read_bytes() == made
    code, err = script("circuits.seed=1", "--overwrite")
    assert code == 0, err[-2000:]
    assert json.loads((out / "config.json").read_text())["config"]["circuits"]["seed"] == 1
