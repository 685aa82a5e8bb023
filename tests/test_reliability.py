"""Bad inputs and hostile environments: one clear line and exit 2, nothing overwritten (each case here
failed with a traceback or a silent wrong result before it was fixed)."""
import json
import os
import runpy
import sys

import pytest
from conftest import ROOT
from conftest import SMALL_DATA as SMALL

from iclvsft.config import load_config
from iclvsft.data import generate
from iclvsft.errors import ConfigError, DataError

EVAL = ["--model", "tiny-random-qwen2", "--tasks", "expression", "--shots", "0", "--quiet"]


@pytest.fixture
def data(tmp_path):  # not conftest's shared small_data: a fresh copy per test, which may corrupt it
    out = tmp_path / "data"
    generate(load_config(None, SMALL), out, show_progress=False)
    return out


def script(name: str, *argv: str, capsys) -> tuple[int, str]:
    """Run a top-level script in this process; (exit code, stderr)."""
    old = sys.argv
    sys.argv = [name, *map(str, argv)]
    try:
        runpy.run_path(str(ROOT / name), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = old
    err = capsys.readouterr().err
    return code, err


def one_line(code: int, err: str, match: str) -> None:
    assert code == 2, err[-2000:]
    assert "Traceback" not in err and match in err, err[-2000:]


def test_non_utf8_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_a_key_written_twice_is_refused_not_silently_the_last(tmp_path, capsys, monkeypatch):
    """YAML keeps the last of two equal keys; a config (or a CLI override value) with one twice is refused
    with one line naming the key, and a refused run creates no folder."""
    path = tmp_path / "dup.yaml"
    path.write_text("name: dup\nft:\n  learning_rate: 1.0e-4\n  method: lora\n  learning_rate: 2.0e-4\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(key 'learning_rate' appears twice \(line 5\)\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="key 'a' appears twice"):
        load_config(None, ["reproduce.ft_protocols={a: {}, a: {learning_rate: 1.0e-5}}"])
    assert load_config(None, ["reproduce.ft_protocols={a: {}, b: {}}"]).reproduce.ft_protocols == {"a": {}, "b": {}}
    monkeypatch.setattr(sys, "argv", ["finetune.py", "--config", str(path), "--task", "expression", "--out",
                                      str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "finetune.py"), run_name="__main__")
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "appears twice" in err
    assert not (tmp_path / "out").exists()


def test_non_utf8_jsonl_and_manifest_shape(data):
    from iclvsft.data import load_items, load_manifest

    manifest = json.loads((data / "manifest.json").read_text())
    (data / "expression" / "test.jsonl").write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(DataError, match="sha256|not UTF-8"):
        load_items(data, "expression", "test")
    with pytest.raises(DataError, match="not UTF-8"):
        load_items(data, "expression", "test", verify=False)
    for broken in ({**manifest, "tasks": []}, {**manifest, "tasks": {"expression": {"files": {}}}},
                   {**manifest, "tasks": {"expression": {"files": {"train": {"path": "x"}, "test": {"path": "y"}}}}},
                   [1, 2], {**manifest, "generator": "iclvsft 0.0.1"}):
        (data / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(DataError, match="regenerate"):
            load_manifest(data)


def test_cli_errors_are_one_line(data, tmp_path, capsys):
    # --out naming a file
    (tmp_path / "file").write_text("x")
    one_line(*script("test.py", "--data", data, "--out", tmp_path / "file", *EVAL, capsys=capsys), "is a file")
    # a corrupt run.json
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "run.json").write_text("{not json")
    one_line(*script("test.py", "--data", data, "--out", bad, *EVAL, capsys=capsys), "unreadable")
    # a bad value, given after the named options (argparse used to say "unrecognized arguments")
    one_line(*script("test.py", "--data", data, "--out", tmp_path / "o", *EVAL, "eval.limit=-1", capsys=capsys),
             "eval.limit must be >= 0")
    # an empty test file that its manifest vouches for (a data folder with no test items)
    empty = tmp_path / "empty"
    generate(load_config(None, [*SMALL, "data.test_pattern=0", "data.test_control=0"]), empty, show_progress=False)
    one_line(*script("test.py", "--data", empty, "--out", tmp_path / "e", *EVAL, capsys=capsys), "no test items")


def test_finished_run_reads_again_in_a_read_only_folder(data, tmp_path, capsys):
    out = tmp_path / "ro"
    code, err = script("test.py", "--data", data, "--out", out, *EVAL, capsys=capsys)
    assert code == 0, err[-2000:]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for p in [out, *out.iterdir()]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        code, err = script("test.py", "--data", data, "--out", out, *EVAL, capsys=capsys)
        if os.geteuid() != 0:  # root writes through permissions; the no-rewrite rule is checked below anyway
            assert code == 0, err[-2000:]
    finally:
        for p in [out, *out.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_unchanged_file_is_not_rewritten(tmp_path):
    from iclvsft.io import atomic_write_text

    path = tmp_path / "m.json"
    atomic_write_text(path, "same")
    mtime = path.stat().st_mtime_ns
    os.utime(path, ns=(mtime - 10**9, mtime - 10**9))
    atomic_write_text(path, "same")
    assert path.stat().st_mtime_ns == mtime - 10**9
    atomic_write_text(path, "other")
    assert path.read_text() == "other"


def test_truncated_weights_are_one_line(tmp_path, tiny):
    """A model folder whose safetensors file was cut short (a killed save, a full disk) used to end in a
    safetensors traceback."""
    from iclvsft.models import load_model

    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="truncated or corrupt"):
        load_model(str(tmp_path / "m"))


def test_full_disk_is_one_line(monkeypatch, capsys):
    import errno

    from iclvsft import cli

    def main():
        raise OSError(errno.ENOSPC, "No space left on device", "/results/x/samples.jsonl")

    with pytest.raises(SystemExit) as e:
        cli.run(main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "disk is full" in err and "samples.jsonl" in err


# --- stale results: the identity covers what a result depends on ------------------------------------

def _evaluate(data, out, tiny, adapter=None, overrides=()):
    from iclvsft.evaluate import EvalPlan, evaluate

    config = load_config(None, [*SMALL, "model=tiny-random-qwen2", "eval.shots=[0]", "eval.batch_size=4",
                                "eval.tasks=[expression]", *overrides])
    return evaluate(EvalPlan(config, data, out, "tiny-random-qwen2", adapter), loaded=tiny, show_progress=False)


def test_adapter_changed_in_place_is_another_run(data, tmp_path, tiny):
    """An adapter retrained under the same path (finetune.py --overwrite) used to return the old
    adapter's results from the same --out: its weights are now part of the identity, by content."""
    import torch
    from peft import LoraConfig, get_peft_model

    from iclvsft.models import load_model

    def save_adapter(scale):
        model = get_peft_model(load_model("tiny-random-qwen2").model, LoraConfig(r=2, target_modules=["q_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(scale)
        model.save_pretrained(tmp_path / "adapter")

    save_adapter(0.0)
    loaded = load_model("tiny-random-qwen2", adapter=str(tmp_path / "adapter"))
    _evaluate(data, tmp_path / "out", loaded, adapter=str(tmp_path / "adapter"))
    save_adapter(0.5)
    with pytest.raises(ConfigError, match="adapter_sha256"):
        _evaluate(data, tmp_path / "out", loaded, adapter=str(tmp_path / "adapter"))


def test_other_train_pool_is_another_run(tmp_path, tiny):
    """Data regenerated with another train pool (the demonstrations) but the same test file used to
    reuse rows built from the old demonstrations."""
    a, b = tmp_path / "a", tmp_path / "b"
    generate(load_config(None, SMALL), a, show_progress=False)
    generate(load_config(None, [*SMALL, "data.train_pattern=17"]), b, show_progress=False)
    sha = {d: json.loads((d / "manifest.json").read_text())["tasks"]["expression"]["files"] for d in (a, b)}
    assert sha[a]["test"]["sha256"] == sha[b]["test"]["sha256"] != "" and sha[a]["train"] != sha[b]["train"]
    _evaluate(a, tmp_path / "out", tiny)
    with pytest.raises(ConfigError, match="train_sha256"):
        _evaluate(b, tmp_path / "out", tiny)


def test_runs_into_one_folder_add_up(data, tmp_path, tiny):
    """Another run into the same folder with other shots or other tasks keeps every earlier cell in
    metrics.json and table.md (it used to replace them with its own)."""
    out = tmp_path / "out"
    first = _evaluate(data, out, tiny)
    second = _evaluate(data, out, tiny, overrides=["eval.shots=[2]", "eval.demo_seeds=[0]"])
    assert set(first["cells"]) < set(second["cells"]) == {"expression/k=0", "expression/k=2/seed=0"}
    third = _evaluate(data, out, tiny, overrides=["eval.tasks=[boolean]"])  # was: "differs in data_sha256"
    assert set(third["cells"]) == {"expression/k=0", "expression/k=2/seed=0", "boolean/k=0"}
    assert set(third["identity"]["data_sha256"]) == {"expression", "boolean"}
    table = (out / "table.md").read_text()
    assert "| expression | 2 |" in table and "| boolean | 0 |" in table


# --- logs a person can read ----------------------------------------------------------------------------

def test_progress_bars_write_plain_lines_off_a_terminal(capsys):
    from iclvsft.io import progress

    for _ in progress(range(3), desc="outer"):
        for _ in progress(range(2), desc="inner", nested=True, leave=False):
            pass
    err = capsys.readouterr().err
    assert "outer" in err and "inner" not in err and "\x1b[" not in err  # no cursor moves in a log file


def test_info_lines_come_from_the_main_process_only():
    code = ("import logging, sys; from iclvsft import cli; "
            "cli.run(lambda: logging.getLogger('iclvsft.x').info('hello from this process') or 0)")
    import subprocess

    for rank, shown in (("0", True), ("1", False)):
        env = {**os.environ, "RANK": rank}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and ("hello from this process" in out.stderr) == shown, out.stderr


def test_peft_deprecation_warning_is_silenced_where_peft_triggers_it(tmp_path, tiny):
    """Making and loading an adapter used to print transformers' is_gradient_checkpointing FutureWarning
    (peft's getattr) several times per run."""
    import warnings

    from peft import LoraConfig

    from iclvsft.models import load_model
    from iclvsft.models.loading import quiet_peft_deprecation

    with quiet_peft_deprecation():
        from peft import get_peft_model

        get_peft_model(load_model("tiny-random-qwen2").model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
            tmp_path / "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model("tiny-random-qwen2", adapter=str(tmp_path / "a"))
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_identity_recorded_before_a_key_existed(tmp_path):
    """A run recorded before prompt_style existed was raw by construction: it matches a raw run, not a
    chat one; a content hash is never assumed."""
    from iclvsft.runs import compare_identity

    (tmp_path / "run.json").write_text(json.dumps({"identity": {"model": "m"}}))
    assert compare_identity(tmp_path / "run.json", {"model": "m", "prompt_style": "raw"}) == []
    assert compare_identity(tmp_path / "run.json", {"model": "m", "prompt_style": "chat"}) != []
    assert compare_identity(tmp_path / "run.json", {"model": "m", "prompt_style": "raw", "model_sha256": "x"}) != []


# --- issue 23: one line, nothing half-made --------------------------------------------------------------

def _made(tmp_path) -> set[str]:
    return {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}


def test_a_folder_option_naming_a_file_is_one_line_in_every_script(data, tmp_path, capsys, monkeypatch):
    """--out / --results / --data naming an existing file used to end in a NotADirectoryError traceback
    (generate_data.py, analyze_circuits.py) or a misleading "no manifest at FILE/manifest.json"; now
    every script says which option names a file, before creating anything."""
    monkeypatch.chdir(tmp_path)  # a default folder would land here
    file = tmp_path / "file"
    file.write_text("x")
    before = _made(tmp_path)
    cases = [("generate_data.py", "--out", ["data.tasks=[expression]"]),
             ("finetune.py", "--out", ["--data", data, "--task", "expression", "--model", "tiny-random-qwen2"]),
             ("finetune.py", "--data", ["--out", tmp_path / "ft", "--task", "expression"]),
             ("test.py", "--out", ["--data", data, *EVAL]),
             ("test.py", "--data", ["--out", tmp_path / "ev", *EVAL]),
             ("reproduce.py", "--results", ["--data", data]),
             ("reproduce.py", "--data", ["--results", tmp_path / "res"]),
             ("analyze_circuits.py", "--out", ["--data", data, "--model", "tiny-random-qwen2"]),
             ("analyze_circuits.py", "--data", ["--out", tmp_path / "ci", "--model", "tiny-random-qwen2"])]
    for name, flag, rest in cases:
        code, err = script(name, flag, file, *rest, capsys=capsys)
        one_line(code, err, f"{flag} {file} is a file")
        assert len(err.strip().splitlines()) == 1, (name, flag, err[-2000:])
        assert _made(tmp_path) == before, (name, flag)


def test_non_finite_numbers_are_refused_at_load(data, tmp_path, capsys):
    """ft.epochs=.inf (YAML's infinity) passed every check: finetune.py made the folder, loaded the model
    and ended in the Trainer's OverflowError traceback; a nan passes no comparison, so it slipped
    through every range check."""
    for override in ("ft.epochs=.inf", "ft.epochs=.nan", "ft.learning_rate=.nan", "eval.batch_size=.inf"):
        with pytest.raises(ConfigError, match=r"must be (a finite number|of type int)"):
            load_config(None, [override])
    code, err = script("finetune.py", "--data", data, "--task", "expression", "--out", tmp_path / "ft",
                       "ft.epochs=.inf", capsys=capsys)
    one_line(code, err, "ft.epochs must be a finite number, got inf")
    assert not (tmp_path / "ft").exists()


def test_report_to_a_missing_package_is_one_line_before_any_model_loads(data, tmp_path, capsys, monkeypatch):
    """ft.report_to naming a logger whose package is not installed: refused when the config loads (no
    model loaded, no folder made), not by the Trainer after the model is built."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    from iclvsft.models import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("no model may load"))
    code, err = script("finetune.py", "--data", data, "--task", "expression", "--out", tmp_path / "ft",
                       "ft.report_to=wandb", capsys=capsys)
    one_line(code, err, "ft.report_to=wandb needs the wandb package: pip install wandb")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "ft").exists()


def test_a_bad_optimizer_or_its_missing_package_is_one_line_before_any_model_loads(data, tmp_path, capsys,
                                                                                  monkeypatch):
    """ft.optimizer: a name transformers does not know, or a low-precision optimizer whose package
    (torchao) is not installed: refused when the config loads, not by the Trainer after the model is built."""
    import importlib.util

    from iclvsft.models import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("no model may load"))
    code, err = script("finetune.py", "--data", data, "--task", "expression", "--out", tmp_path / "ft",
                       "ft.optimizer=adamw_nope", capsys=capsys)
    one_line(code, err, "ft.optimizer: unknown optimizer 'adamw_nope'; use a transformers TrainingArguments.optim "
             "name, e.g. adamw_torch_fused (the default) or adamw_torch_8bit")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchao" else real_find_spec(name, *a))
    code, err = script("finetune.py", "--data", data, "--task", "expression", "--out", tmp_path / "ft",
                       "ft.method=full", "ft.optimizer=adamw_torch_8bit", capsys=capsys)
    one_line(code, err, "ft.optimizer=adamw_torch_8bit needs the torchao package: pip install torchao "
             "(or ft.optimizer=adamw_torch_fused)")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "ft").exists()


def test_ctrl_c_is_one_line_and_exit_130():
    """Ctrl-C used to print a KeyboardInterrupt traceback (tens of lines from torch or the Trainer)."""
    import subprocess

    # SIGINT's default handler set explicitly: a shell running the suite in the background starts it ignored
    code = ("import os, signal\nfrom iclvsft import cli\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "cli.run(lambda: os.kill(os.getpid(), signal.SIGINT))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 130, out.stderr[-2000:]
    assert out.stderr.strip() == "interrupted; rerun the same command to continue"


def test_a_data_size_that_cannot_fit_in_memory_is_refused_at_load(tmp_path, capsys):
    """data.train_pattern=1000000000 used to start drawing items (for days, at 0.2-0.9 ms each) until the
    machine ran out of memory; now the config is refused when it loads: every item is held in memory
    (>= 500 bytes each, measured 700-1,330), and 6e9 items cannot fit in this machine's RAM."""
    with pytest.raises(ConfigError, match=r"data: 6,000,004,760 items over 6 task\(s\) need at least 2,794 GiB of "
                                          r"memory .* more than this machine's"):
        load_config(None, ["data.train_pattern=1000000000"])
    load_config(None, ["data.train_pattern=100000"])  # 50 MB per task: fine
    code, err = script("generate_data.py", "--out", tmp_path / "d", "data.train_pattern=1000000000", capsys=capsys)
    one_line(code, err, "lower data.train_pattern")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "d").exists()
