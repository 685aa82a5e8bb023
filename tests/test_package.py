"""The installable package: the wheel (entry point, shipped configs, LICENSE, dependency ranges that
admit the lock), `pip install -e`, the `iclvsft` command and the rules every command shares
(`--config NAME`, the data folder that --config implies, `--overwrite`, messages naming real flags)."""
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, run_all

from iclvsft import __version__, commands
from iclvsft.errors import ConfigError

SCRIPTS = {"generate": "generate_data.py", "finetune": "finetune.py", "test": "test.py", "reproduce": "reproduce.py",
           "circuits": "analyze_circuits.py"}
ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")


def _source_copy(dest: Path, with_symlink: bool = False) -> Path:
    """What a source distribution holds (pyproject, README, LICENSE, the package), copied out of the
    checkout, so that building never writes build/ or *.egg-info into it (others work there too)."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "iclvsft", dest / "iclvsft", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if with_symlink:  # the checkout's configs/ -> iclvsft/configs
        (dest / "configs").symlink_to(Path("iclvsft") / "configs")
    return dest


def _locked_venv(path: Path) -> Path:
    """A fresh venv that sees the locked packages of the project's environment, offline.

    ``--system-site-packages`` would expose the base interpreter's packages, not those of the venv
    running the tests (where requirements.txt is installed), and installing them again needs the
    network: a ``.pth`` line adds that site-packages *after* the new venv's own, so what is installed
    into the new venv (the wheel) wins, and nothing is downloaded. ``--without-pip``: pip and
    setuptools come from the locked environment too (the new venv's bundled setuptools would shadow
    the one the build needs)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "iclvsft-locked.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _pip(python: Path, *args: str) -> None:
    r = subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "--no-input", *args],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def _requirements(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_from_anywhere(tmp_path):
    from packaging.requirements import Requirement

    src = _source_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "--disable-pip-version-check", "-w", str(dist), str(src)],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (wheel,) = dist.glob("iclvsft-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    shipped = {p.relative_to(ROOT / "iclvsft").as_posix() for p in (ROOT / "iclvsft" / "configs").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert {f"iclvsft/{p}" for p in shipped} <= names and "iclvsft/configs/cpu.yaml" in names
    assert any(n.endswith("licenses/LICENSE") for n in names) and "License-Expression: MIT" in meta
    assert "iclvsft = iclvsft.__main__:main" in entry_points and f"Version: {__version__}\n" in meta
    assert wheel.name == f"iclvsft-{__version__}-py3-none-any.whl"
    assert not any(n.startswith(("tests/", "configs/")) for n in names)

    # Ranges, not pins, and the lock (requirements.txt, what `make` installs) satisfies every one.
    requires = [Requirement(line.split(":", 1)[1].strip()) for line in meta.splitlines()
                if line.startswith("Requires-Dist:")]
    runtime = [q for q in requires if q.marker is None]
    assert {q.name for q in runtime} >= {"torch", "transformers", "peft", "accelerate", "numpy", "scipy", "pyyaml"}
    assert len(runtime) < 20 and not any(str(q.specifier).startswith("==") for q in runtime)
    locked = _requirements(ROOT / "requirements.txt")
    for q in runtime:
        name = re.sub(r"[-_.]+", "-", q.name).lower()
        assert name in locked, f"{q.name} is a dependency but not in the lock"
        assert q.specifier.contains(locked[name], prereleases=True), f"the lock's {q.name}=={locked[name]} is outside {q}"

    python = _locked_venv(tmp_path / "venv")
    _pip(python, "install", "--no-deps", "--no-index", str(wheel))
    iclvsft = tmp_path / "venv" / "bin" / "iclvsft"
    work = tmp_path / "elsewhere"  # no configs/ here: the presets must come from the installed package
    work.mkdir()

    def run(*args):
        return subprocess.run([str(iclvsft), *map(str, args)], cwd=work, capture_output=True, text=True,
                              timeout=120, env=ENV)

    where = subprocess.run([str(python), "-c", "import iclvsft.commands as c; print(c.__file__, c.CONFIG_DIR)"],
                           cwd=work, capture_output=True, text=True, env=ENV).stdout.split()
    assert where[0].startswith(str(tmp_path / "venv")), where  # the wheel, not the checkout
    # The sandbox's child is a script file of the package: shipped, and started from the installed copy.
    assert "iclvsft/sandbox_child.py" in names
    ran = subprocess.run([str(python), "-c", "from iclvsft import sandbox; print(sandbox._CHILD); "
                          "print(sandbox.run_programs(['print(6 * 7)', 'import os'], timeout_s=5.0))"],
                         cwd=work, capture_output=True, text=True, env=ENV, timeout=120)
    child, results = ran.stdout.splitlines()[-2:]
    assert child.startswith(str(tmp_path / "venv")) and child.endswith("sandbox_child.py"), ran.stdout + ran.stderr
    assert results == ("[SandboxResult(stdout='42\\n', error=None), "
                       "SandboxResult(stdout='', error='ImportError: __import__ not found')]"), ran.stdout + ran.stderr
    helped = run("--help")
    assert helped.returncode == 0 and all(name in helped.stdout for name in SCRIPTS)
    r = run("generate", "--config", "quick", "--tasks", "expression", "--quiet", "data.train_pattern=8",
            "data.train_control=0")
    assert r.returncode == 0, r.stderr[-2000:]
    # --config quick: the shipped preset (its name picks the folder data/quick, its test sizes apply)
    manifest = json.loads((work / "data" / "quick" / "manifest.json").read_text())
    assert list(manifest["tasks"]) == ["expression"]
    assert manifest["tasks"]["expression"]["files"]["test"]["counts"] == {"pattern": 40, "control": 40}
    assert {p.name for p in (work / "data" / "quick" / "expression").iterdir()} == {"train.jsonl", "test.jsonl"}
    r = run("generate", "--config", "configs/quick.yaml", "--tasks", "expression", "--quiet", "data.train_pattern=8",
            "data.train_control=0")  # the checkout's spelling, outside a checkout: the same preset
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stderr[-2000:]
    r = run("test", "--help")
    assert r.returncode == 0 and "usage: iclvsft test" in r.stdout and "--overwrite" in r.stdout
    r = run("generate", "--config", "nope")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "quick" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([str(python), "-m", "iclvsft", "configs"], cwd=work, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and Path(r.stdout.strip(), "accelerate", "ddp.yaml").is_file()


@pytest.mark.slow
def test_editable_install_uses_the_source_tree(tmp_path):
    src = _source_copy(tmp_path / "src", with_symlink=True)
    python = _locked_venv(tmp_path / "venv")
    _pip(python, "install", "--no-deps", "--no-index", "--no-build-isolation", "-e", str(src))
    r = subprocess.run([str(tmp_path / "venv" / "bin" / "iclvsft"), "configs"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60, env=ENV)
    assert r.returncode == 0 and Path(r.stdout.strip()) == src / "iclvsft" / "configs", r.stderr[-2000:]


def test_configs_have_one_copy_shipped_in_the_package():
    assert (ROOT / "configs").is_symlink() and (ROOT / "configs").resolve() == (ROOT / "iclvsft" / "configs").resolve()
    assert commands.CONFIG_DIR == (ROOT / "iclvsft" / "configs").resolve()
    assert {"cpu", "quick", "paper", "ladder", "ft_authors"} <= set(commands.presets())
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_config_names_resolve_to_the_shipped_presets(tmp_path, monkeypatch):
    shipped = str(commands.CONFIG_DIR / "cpu.yaml")
    assert commands.resolve_config_path(None) is None
    monkeypatch.chdir(ROOT)
    assert commands.resolve_config_path("configs/cpu.yaml") == "configs/cpu.yaml"  # a file: as given
    monkeypatch.chdir(tmp_path)  # outside the checkout
    assert commands.resolve_config_path("cpu") == shipped
    assert commands.resolve_config_path("cpu.yaml") == shipped
    assert commands.resolve_config_path("configs/cpu.yaml") == shipped
    assert commands.resolve_config_path("configs/accelerate/ddp.yaml") == str(commands.CONFIG_DIR / "accelerate" / "ddp.yaml")
    (tmp_path / "mine.yaml").write_text("name: mine\n")
    (tmp_path / "cpu.yaml").write_text("name: local\n")
    assert commands.resolve_config_path("mine.yaml") == "mine.yaml"
    assert commands.resolve_config_path("cpu.yaml") == "cpu.yaml"  # an existing file wins over a preset
    with pytest.raises(ConfigError, match="quick"):
        commands.resolve_config_path("nope")
    with pytest.raises(ConfigError, match="not found"):
        commands.resolve_config_path("elsewhere/cpu.yaml")


def test_config_implies_the_presets_data_folder():
    from argparse import Namespace

    from iclvsft.config import load_config

    quick = load_config(commands.resolve_config_path("quick"))
    assert commands.default_data_dir(Namespace(config="x.yaml"), quick) == Path("data/quick")  # as reproduce.py
    assert commands.default_data_dir(Namespace(config=None), load_config(None)) == Path("data")
    assert commands.default_data_dir(Namespace(config=None), load_config(None, ["name=x"])) == Path("data")
    assert commands.default_data_dir(Namespace(config="x.yaml", data="d"), quick) == Path("d")
    assert commands.default_data_dir(Namespace(config="x.yaml", out="o"), quick, dest="out") == Path("o")


def test_test_script_with_config_reads_the_presets_data_folder(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "test.py"), "--config", "quick", "--model", "tiny-random-qwen2",
                        "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 2 and "data/quick" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_subcommands_take_exactly_the_scripts_options():
    commands = [[sys.executable, *how, "--help"] for name, script in SCRIPTS.items()
                for how in (["-m", "iclvsft", name], [script])]
    done = dict(zip(map(tuple, commands), run_all(*commands, cwd=ROOT, timeout=60, env=ENV)))  # each --help run once

    def options(cmd):
        r = done[tuple(cmd)]
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout, set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", r.stdout))

    for name, script in SCRIPTS.items():
        entry_text, entry = options([sys.executable, "-m", "iclvsft", name, "--help"])
        script_text, from_script = options([sys.executable, script, "--help"])
        assert entry == from_script and "--config" in entry, name
        assert f"usage: iclvsft {name}" in entry_text and f"usage: {script}" in script_text
    assert "--overwrite" in options([sys.executable, "reproduce.py", "--help"])[1]
    assert {"--force", "--overwrite"} <= options([sys.executable, "generate_data.py", "--help"])[1]


def test_help_names_the_command_as_it_was_run(capsys):
    """`iclvsft X --help` names `iclvsft X` (not the module or the script), docstrings print unindented."""
    from iclvsft import __main__ as entry

    def helped(*argv):
        with pytest.raises(SystemExit) as e:
            entry.main(list(argv))
        assert e.value.code == 0
        return capsys.readouterr().out

    assert helped("models", "--help").startswith("usage: iclvsft models ")
    assert helped("export-lm-eval", "--help").startswith("usage: iclvsft export-lm-eval ")
    text = helped("configs", "--help")
    assert text.startswith("usage: iclvsft configs\n") and "\nand the preset names" in text and "\n " not in text
    text = helped("finetune", "--help")
    assert "finetune.py" not in text and '"$(iclvsft configs)"/accelerate/ddp.yaml' in text
    assert "-m iclvsft finetune --task code" in text


def test_entry_point_errors_are_one_line(monkeypatch, capsys):
    from iclvsft import __main__ as entry

    for argv, match in ((["tset"], "did you mean 'test'"), ([], "usage: iclvsft")):
        with pytest.raises(SystemExit) as e:
            entry.main(argv)
        assert e.value.code == 2 and match in capsys.readouterr().err
    monkeypatch.setitem(entry.COMMANDS, "export-lm-eval", ("iclvsft.no_such_module", "main", "x"))
    with pytest.raises(SystemExit) as e:
        entry.main(["export-lm-eval"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and err.count("\n") == 1 and "not available" in err
    with pytest.raises(SystemExit) as e:
        entry.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"iclvsft {__version__}\n"


def test_reproduce_messages_name_its_own_flags():
    """The shared stages raise remedies as keys (iclvsft/evaluate/run.py, iclvsft/train/run.py, study.py);
    reproduce.py words them for --results and its --overwrite, test.py and finetune.py keep the defaults."""
    def worded(error, words=commands.REPRODUCE_WORDS, flag="--results"):
        with pytest.raises((ConfigError, OSError)) as caught, commands._worded_errors(words, flag):
            raise error
        return str(caught.value)

    other_run = ConfigError("results/quick/icl/m holds results of another run (differs in limit: 1 -> 2)",
                            "another_out", "move_folder")
    assert str(other_run).endswith("; choose another --out, or move that folder away")  # test.py's own wording
    msg = worded(other_run)
    assert msg.endswith("; choose another --results, or move that folder away") and "--out" not in msg
    msg = worded(ConfigError("is a file", "choose_folder", out="results/quick/ft/x"))
    assert msg == "results/quick/ft/x (under --results) is a file; choose a folder"
    assert str(ConfigError("is a file", "choose_folder", out="x")) == "--out x is a file; choose a folder"
    msg = worded(ConfigError("r/ft/x holds an unfinished run with another config (lr)", "resume", "overwrite_start"))
    assert msg.endswith("rerun with the same settings to resume it, or pass --overwrite to rerun the whole study "
                        "from scratch")
    msg = worded(ConfigError("r/ft/x holds a finished run made with other settings (ft.learning_rate: 0.0002 -> 0.01)",
                             "another_results", "move_run"))
    assert "choose another --results" in msg and msg.endswith("or pass --overwrite to rerun the whole study from scratch")
    msg = worded(ConfigError("data/quick holds data made with other settings", "another_data"))
    assert msg.endswith("or --overwrite to regenerate it and rerun the study")
    msg = worded(OSError(errno.EROFS, "Read-only file system", "results/quick/report.md"))
    assert "choose another --results" in msg and "--out" not in msg and "results/quick/report.md" in msg
    plain = ConfigError("no remedy {braces} kept as written")
    assert worded(plain) == "no remedy {braces} kept as written"
    with pytest.raises(ValueError, match="unknown remedies"):
        ConfigError("x", "no_such_remedy")


def test_overwrite_only_clears_folders_the_command_wrote(tmp_path):
    run = tmp_path / "eval"
    run.mkdir()
    for name in ("run.json", "samples.jsonl", "metrics.json", "table.md", ".metrics.json.tmp"):
        (run / name).write_text("x")
    commands._clear_folder(run, commands.EVAL_FILES, "run.json", "test.py results")  # accepted
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt"):
        commands._clear_folder(run, commands.EVAL_FILES, "run.json", "test.py results")
    home = tmp_path / "home"
    (home / "icl").mkdir(parents=True)  # a reproduce-looking entry but no config.json: not a results folder
    with pytest.raises(ConfigError, match="left alone"):
        commands._clear_folder(home, commands.RESULTS_ENTRIES, "config.json", "reproduce results")


def test_test_overwrite_replaces_a_run_made_with_other_settings(small_data, tmp_path):
    data = small_data
    out = tmp_path / "out"

    def run(*args):
        return subprocess.run([sys.executable, "test.py", "--model", "tiny-random-qwen2", "--tasks", "expression",
                               "--shots", "0", "--quiet", "--data", str(data), "--out", str(out), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=180, env=ENV)

    assert run("--limit", "2").returncode == 0
    refused = run("--limit", "3")
    assert refused.returncode == 2 and "pass --overwrite" in refused.stderr and "Traceback" not in refused.stderr
    replaced = run("--limit", "3", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["identity"]["limit"] == 3
