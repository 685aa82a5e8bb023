"""reproduce.py end to end on the quick preset with the tiny model: interrupted runs (during
fine-tuning and during evaluation) resume to the same report as an uninterrupted run."""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import ROOT
from transformers import TrainerCallback

from iclvsft.config import load_config
from iclvsft.errors import ConfigError
from iclvsft.evaluate import run as eval_run
from iclvsft.fit import Runners
from iclvsft.io import jsonl_line
from iclvsft.jobs import plan_ft
from iclvsft.study import run_study
from iclvsft.train import finetune

TINY = ["model=tiny-random-qwen2", "data.tasks=[expression,boolean,relation]", "data.train_pattern=64",
        "data.train_control=8", "data.test_pattern=6", "data.test_control=6", "eval.shots=[0,2]",
        "eval.demo_seeds=[0,1]", "eval.limit=0", "eval.batch_size=4", "ft.batch_size=4", "ft.per_device_batch_size=2",
        "ft.save_steps=1", "reproduce.ft_protocol_n_train={authors: [4, 8]}", "eval.tasks=[expression,boolean,relation]",
        "reproduce.ft_n_train=[4,8]", "reproduce.ft_tasks=[expression,boolean]",
        "reproduce.ft_protocol_tasks={authors: [expression]}", "circuits.enabled=true", "circuits.n_items=3",
        "circuits.bootstrap=20"]


def quick_config():
    config = load_config(ROOT / "configs" / "quick.yaml", TINY)
    assert set(config.reproduce.ft_protocols) >= {"answer_lora", "authors"}
    return config


class Killed(RuntimeError):
    pass


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """reproduce.py once, uninterrupted (both FT protocols, no circuits): the reference report of the kill -9
    test and the first run of the reuse test. ``command(results)`` is its command line for another results
    folder (the same data folder); ``reference`` holds its report.md and summary.json as written."""
    where = tmp_path_factory.mktemp("quick-study")

    def command(results):
        return [sys.executable, "reproduce.py", "--config", "configs/quick.yaml", "--data", str(where / "d"),
                "--results", str(results), "--quiet", *TINY, "circuits.enabled=false", "reproduce.ft_n_train=[4]",
                "reproduce.ft_protocol_n_train={authors: [4]}"]

    args = command(where / "r")
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    reference = {name: (where / "r" / name).read_bytes() for name in ("report.md", "summary.json")}
    return SimpleNamespace(command=command, args=args, results=where / "r", first=first, reference=reference)


@pytest.mark.slow
def test_interrupted_study_resumes_to_the_same_report(tmp_path, monkeypatch):
    config = quick_config()
    data = tmp_path / "data"
    straight = run_study(config, data, tmp_path / "straight", show_progress=False)

    class KillAtStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise Killed("kill during fine-tuning")

    calls = {"ft": 0}

    def flaky_finetune(cfg, out, data_dir, **kw):
        calls["ft"] += 1
        if calls["ft"] == 2:  # the second fine-tuning run dies mid-way
            return finetune(cfg, out, data_dir, callbacks=[KillAtStep2()], **kw)
        return finetune(cfg, out, data_dir, **kw)

    resumed = tmp_path / "resumed"
    with pytest.raises(Killed):
        run_study(config, data, resumed, show_progress=False, runners=Runners(finetune=flaky_finetune))

    real_append, appends = eval_run.append_rows, {"n": 0}

    def flaky_append(path, rows):
        appends["n"] += 1
        if appends["n"] == 3:  # and evaluation dies writing a chunk
            with open(path, "a") as f:
                f.write(jsonl_line(rows[0])[:20])
            raise Killed("kill during evaluation")
        real_append(path, rows)

    monkeypatch.setattr(eval_run, "append_rows", flaky_append)  # where evaluate() calls it
    with pytest.raises(Killed):
        run_study(config, data, resumed, show_progress=False)
    monkeypatch.setattr(eval_run, "append_rows", real_append)
    report = run_study(config, data, resumed, show_progress=False)

    # Identical but for the results folder's own path (the circuit section names the adapter it used).
    assert (report.read_text().replace(str(resumed), "<results>")
            == straight.read_text().replace(str(tmp_path / "straight"), "<results>"))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "straight", resumed))
    assert a == b
    text = report.read_text()
    for needle in ("## Headline", "## FT protocols compared on the same rows", "## expression", "plots/expression.png",
                   "## Circuit shift", "answer_lora/expression/n8-s0",
                   "| answer_lora | lora | 8 |", "| authors | full | 4 |"):
        assert needle in text, needle
    assert (resumed / "plots" / "expression.png").stat().st_size > 1000
    # each FT row carries its training summary (steps, final loss), the same after the kill
    for row in b["models"][0]["tasks"]["expression"]["ft"]:
        (train,) = row["train"]
        assert train["steps"] > 0 and train["final_loss"] > 0
        assert f"| {row['n_train']} | 1 | {train['steps']} | {train['final_loss']:.3g} |" in text
    runs = plan_ft(config)
    assert {r.protocol for r in runs} == {"answer_lora", "authors"} and len(runs) == 2 * 2 + 2
    for r in runs:
        assert (resumed / "ft" / r.rel / "summary.json").is_file()


@pytest.mark.slow
def test_reproduce_script_reuses_everything(quick_study):
    args, results, first = quick_study.args, quick_study.results, quick_study.first  # the first run: the fixture's
    assert "## Headline" in first.stdout and (results / "report.md").is_file()
    before = quick_study.reference["report.md"].decode()
    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and (results / "report.md").read_text() == before
    assert "fine-tuning" not in second.stderr  # nothing was trained again
    # timings.json keeps both runs, so the reuse run does not erase the wall times of the first.
    runs = json.loads((results / "timings.json").read_text())["runs"]
    assert len(runs) == 2 and runs[1]["seconds"]["total"] < runs[0]["seconds"]["total"]
    # Changed FT settings never silently reuse a finished model.
    third = subprocess.run([*args, "ft.learning_rate=0.01"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert third.returncode == 2 and "other settings" in third.stderr and "Traceback" not in third.stderr


@pytest.mark.slow
def test_kill_9_at_random_points_resumes_to_the_same_report(tmp_path, quick_study):
    """reproduce.py killed with SIGKILL at 5 random moments (seeded) while it works, restarted after
    each, ends with the report of an uninterrupted run, byte for byte (summary.json too)."""
    import os
    import random
    import signal
    import time

    def run(results, **kwargs):
        cmd = quick_study.command(results)  # the reference run's (the fixture's) command and data folder
        log = (tmp_path / "stderr.log").open("w")  # a file, not a pipe: a full pipe would stall the child
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, **kwargs)

    def stderr() -> str:
        return (tmp_path / "stderr.log").read_text()[-3000:]

    def timed(results) -> float:
        started = time.perf_counter()
        proc = run(results)
        proc.wait(timeout=600)
        assert proc.returncode == 0, stderr()
        return time.perf_counter() - started

    def state(folder) -> set:
        # The running study renames temporary files (and folders) into place, so something listed may be
        # gone by the time it is stat'ed: os.walk skips folders it cannot list, and a vanished file is
        # skipped here (the next poll sees what replaced it).
        seen = set()
        for parent, _, names in os.walk(folder):
            for name in names:
                try:
                    st = os.stat(os.path.join(parent, name))
                except FileNotFoundError:
                    continue
                seen.add((os.path.join(parent, name), st.st_size, st.st_mtime_ns))
        return seen

    rng = random.Random(15)
    out = tmp_path / "run"
    for n in range(5):
        # Killed at a seeded random moment within half a second of its first write (the first sign of
        # work: a row, a checkpoint, a log line), so each run does a little of the study and is killed
        # wherever that moment falls (in a write, a training step, a save...).
        before, proc = state(out), run(out)
        delay, written_at = rng.uniform(0.0, 0.5), None
        while proc.poll() is None:
            if written_at is None and state(out) != before:
                written_at = time.perf_counter()
            if written_at is not None and time.perf_counter() - written_at >= delay:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"run {n} ended on its own (rc {proc.returncode}): {stderr()}"
    timed(tmp_path / "run")
    for name in ("report.md", "summary.json"):
        assert (tmp_path / "run" / name).read_bytes() == quick_study.reference[name], name


@pytest.mark.slow
def test_partial_report_after_each_model(tmp_path):
    """A study of several models has a current report.md after each finished model, so a failure late
    in a long run still leaves the finished models' numbers; the final report replaces it."""
    from iclvsft.evaluate import evaluate
    from iclvsft.models import load_model

    second = tmp_path / "tiny-copy"
    loaded = load_model("tiny-random-qwen2")
    loaded.model.save_pretrained(second)
    loaded.tokenizer.save_pretrained(second)
    config = load_config(ROOT / "configs" / "quick.yaml", [*TINY, "circuits.enabled=false", "reproduce.ft_n_train=[4]",
                                                           "reproduce.ft_protocols={answer_lora: {}}",
                                                           f"reproduce.models=[tiny-random-qwen2, {second}]"])
    seen = []

    def watching(plan, **kwargs):
        if plan.model_name.startswith(str(second)) or plan.model_name == str(second):
            report = tmp_path / "r" / "report.md"
            seen.append(report.is_file() and "1 of 2 models done" in report.read_text())
        return evaluate(plan, **kwargs)

    final = run_study(config, tmp_path / "d", tmp_path / "r", show_progress=False, runners=Runners(evaluate=watching))
    assert seen and all(seen)
    text = final.read_text()
    assert "Partial report" not in text and text.count("# ICL vs FT on implicit patterns") == 2
    # several models: accuracy vs model size, a table row per task and model, and its plot
    assert "## Accuracy vs model size" in text and "| expression | tiny-random-qwen2 | " in text
    assert (tmp_path / "r" / "plots" / "sizes.png").is_file()


def test_the_verdicts_ft_cell_gets_its_own_train_seeds():
    """reproduce.compare_train_seeds: three optimisation runs at the declared cell (protocol, N), one elsewhere."""
    config = load_config(None, ["reproduce.ft_tasks=[expression,relation]", "reproduce.ft_n_train=[16,256]",
                                "reproduce.ft_train_seeds=[0]", "reproduce.compare_train_seeds=[0,1,2]",
                                "reproduce.ft_protocols={answer_lora: {}, other: {learning_rate: 1.0e-4}}"])
    seeds = {}
    for r in plan_ft(config):
        seeds.setdefault((r.protocol, r.tasks, r.n_train), []).append(r.train_seed)
    assert seeds[("answer_lora", ("expression",), 256)] == [0, 1, 2] == seeds[("answer_lora", ("relation",), 256)]
    assert seeds[("answer_lora", ("expression",), 16)] == [0] and seeds[("other", ("expression",), 256)] == [0]
    assert load_config(ROOT / "configs" / "cpu.yaml").reproduce.compare_train_seeds == [0, 1, 2]


def test_a_finished_circuits_folder_is_reused_only_with_its_own_settings(tmp_path):
    """reproduce.py used to reuse circuits.json whatever circuits.n_items / seed / shots now say; the folder's
    config.json is compared with the settings first (the derived FT folder is a study run, checked as such)."""
    from iclvsft.circuits import check_circuit_settings as _check_circuit_settings

    made = load_config(None, ["circuits.n_items=8", "circuits.adapter=/r/ft/{task}/n256-s0"])
    (tmp_path / "config.json").write_text(json.dumps({"config": made.to_dict()}))
    now = load_config(None, ["circuits.n_items=8", "circuits.adapter=/elsewhere/ft/{task}/n256-s0"])
    _check_circuit_settings(tmp_path, now, derived_adapter=True)  # same settings: reused
    for change in ("circuits.n_items=16", "circuits.seed=1", "circuits.shots=2", "data.seed=3", "dtype=fp32"):
        other = load_config(None, ["circuits.n_items=8", change])
        with pytest.raises(ConfigError, match="holds circuit results made with other settings"):
            _check_circuit_settings(tmp_path, other, derived_adapter=True)
    with pytest.raises(ConfigError, match="circuits.adapter"):  # an FT folder the user named is part of it
        _check_circuit_settings(tmp_path, now, derived_adapter=False)
