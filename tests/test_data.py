"""generate_data.py and the data layer: pools, disjointness, manifest, determinism, errors."""
import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from iclvsft.config import load_config
from iclvsft.data import generate, load_items, normalise_question
from iclvsft.errors import ConfigError, DataError
from iclvsft.io import sha256_file

# Its own: every default task (each one's schema and seed are checked), at sizes with room for overlap.
SMALL = ["data.train_pattern=300", "data.train_control=60", "data.test_pattern=50", "data.test_control=50"]


def run_script(*args, cwd=ROOT, script="generate_data.py"):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def full_data(tmp_path_factory):
    """The default pools (train 4096+512, test 200+200, parity pattern only), generated twice."""
    out1, out2 = tmp_path_factory.mktemp("d1"), tmp_path_factory.mktemp("d2")
    config = load_config(None)
    return generate(config, out1, show_progress=False), out1, generate(config, out2, show_progress=False), out2


def test_default_pools_counts_and_zero_overlap(full_data):
    manifest, out, _, _ = full_data
    assert manifest["overlap_total"] == 0
    for name, entry in manifest["tasks"].items():
        train, test = entry["files"]["train"], entry["files"]["test"]
        if name == "parity":
            assert train["counts"] == {"pattern": 4096} and test["counts"] == {"pattern": 200}
        else:
            assert train["counts"] == {"pattern": 4096, "control": 512}
            assert test["counts"] == {"pattern": 200, "control": 200}
        assert entry["overlap_test_train"] == 0
        # Re-check overlap and duplicates from the files themselves.
        tr = [normalise_question(i.question) for i in load_items(out, name, "train")]
        te = [normalise_question(i.question) for i in load_items(out, name, "test")]
        assert len(set(tr)) == len(tr) and len(set(te)) == len(te)
        assert not set(tr) & set(te)
        for pool in ("train", "test"):
            assert sha256_file(out / name / f"{pool}.jsonl") == entry["files"][pool]["sha256"]


def test_same_config_same_bytes(full_data):
    _, out1, _, out2 = full_data
    files = sorted(p.relative_to(out1) for p in out1.rglob("*") if p.is_file())
    assert len(files) == 14  # 6 tasks x 2 pools, manifest.json, README.md (the dataset card)
    for rel in files:
        assert (out1 / rel).read_bytes() == (out2 / rel).read_bytes(), rel


def test_other_seed_other_items(tmp_path):
    a = generate(load_config(None, [*SMALL, "data.seed=1"]), tmp_path / "a", show_progress=False)
    b = generate(load_config(None, [*SMALL, "data.seed=2"]), tmp_path / "b", show_progress=False)
    for name in a["tasks"]:
        qa = {i.question for i in load_items(tmp_path / "a", name, "test")}
        qb = {i.question for i in load_items(tmp_path / "b", name, "test")}
        assert len(qa & qb) < 0.5 * len(qa), name
        assert a["tasks"][name]["files"]["test"]["sha256"] != b["tasks"][name]["files"]["test"]["sha256"]


def test_rows_have_the_spec_fields(tmp_path):
    generate(load_config(None, [*SMALL, "data.tasks=[expression]"]), tmp_path, show_progress=False)
    row = json.loads((tmp_path / "expression" / "test.jsonl").read_text().splitlines()[0])
    assert set(row) == {"id", "task", "split", "question", "answer", "shortcut_answer", "meta"}
    assert isinstance(row["meta"], str) and {"seed", "index", "pool"} <= set(json.loads(row["meta"]))  # one schema: a JSON string


def test_corrupt_or_edited_files_give_clear_errors(tmp_path):
    generate(load_config(None, [*SMALL, "data.tasks=[boolean]"]), tmp_path, show_progress=False)
    path = tmp_path / "boolean" / "test.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]) + "{not json\n" + "".join(lines[3:]))
    with pytest.raises(DataError, match="sha256"):
        load_items(tmp_path, "boolean", "test")
    with pytest.raises(DataError, match=r"test.jsonl:4: corrupt JSON"):
        load_items(tmp_path, "boolean", "test", verify=False)
    path.write_text('{"id": "x"}\n')
    with pytest.raises(DataError, match="missing fields"):
        load_items(tmp_path, "boolean", "test", verify=False)
    with pytest.raises(DataError, match="generate_data.py"):
        load_items(tmp_path / "nowhere", "boolean", "test")
    with pytest.raises(DataError, match="not in"):
        load_items(tmp_path, "expression", "test")


def test_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'seed'"):
        load_config(None, ["data.sed=3"])
    with pytest.raises(ConfigError, match="must be of type int"):
        load_config(None, ["data.seed=abc"])
    with pytest.raises(ConfigError, match="unknown task"):
        load_config(None, ["data.tasks=[expression, nope]"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["data.task_params.relation.n_city=5"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")
    assert load_config(None, ["ft.learning_rate=1e-5"]).ft.learning_rate == 1e-5  # YAML 1.1 reads a string


@pytest.mark.parametrize("bad, match", [
    ("eval.limit=-1", "eval.limit must be >= 0"),  # was: part[:-1], 19 of 20 items
    ("eval.shots=[4,4]", "eval.shots must not repeat"),  # was: every row written twice
    ("eval.demo_seeds=[0,0]", "eval.demo_seeds must not repeat"),
    ("eval.max_new_tokens=-5", "eval.max_new_tokens must be >= 0"),  # was: every completion empty
    ("eval.splits=[]", "eval.splits must be distinct names"),  # was: cells silently dropped
    ("eval.splits=[foo]", "eval.splits must be distinct names"),
    ("eval.splits=[pattern,pattern]", "eval.splits must be distinct names"),
    ("eval.demo_seeds=[]", "eval.demo_seeds must not be empty"),
    ("eval.shots=[]", "eval.shots must not be empty"),
    ("eval.demo_split=bogus", "eval.demo_split must be one of pattern, control"),  # was: "the train pool has 0"
    ("data.task_params.expression=3", "must be a mapping"),  # was: a traceback
    ("reproduce.ft_n_train=[0]", "reproduce.ft_n_train must hold integers >= 1"),
    ("reproduce.ft_train_seeds=[1,1]", "must not repeat"),
])
def test_values_that_would_silently_change_results_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [bad])


def test_zero_shot_only_needs_no_demo_seed():
    assert load_config(None, ["eval.shots=[0]", "eval.demo_seeds=[]"]).eval.demo_seeds == []


def test_schema_checks_every_section_at_load():
    """Choices and ranges come from the schema's fields; cross-key rules from each section's check."""
    for bad, match in [("dtype=fp8", "dtype must be one of auto, bf16"), ("eval.demo_mode=bogus", "eval.demo_mode"),
                       ("eval.batch_size=0", "eval.batch_size must be >= 1"), ("circuits.n_items=0", "circuits.n_items"),
                       ("circuits.method=exact", "circuits.method"), ("ft.logits_on=some", "ft.logits_on"),
                       ("circuits={tasks: [parity], corruption: control}", "'control' is not defined for 'parity'"),
                       ("reproduce.ft_protocols={x: {method: qlora}}", "ft.method must be one of"),
                       ("reproduce.ft_protocols={x: {lr: 1}}", "did you mean")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, [bad])
    # a protocol merges into the ft section like any override (a list of LoRA targets included)
    from iclvsft.config import protocol_ft

    config = load_config(None, ["ft.lora.target_modules=[q_proj,v_proj]"])
    assert protocol_ft(config, "answer_lora").lora.target_modules == ["q_proj", "v_proj"]
    # every key documents itself, and the scripts' options take their help and type from it
    from dataclasses import fields

    from iclvsft.config import Config

    def walk(cls, prefix=""):
        for f in fields(cls):
            assert f.metadata.get("help"), f"{prefix}{f.name} has no help"
            if f.metadata.get("section"):
                walk(f.metadata["section"], f"{prefix}{f.name}.")

    walk(Config)
    helped = run_script("--help", script="test.py")
    assert helped.returncode == 0 and "{shared,per_item}" in helped.stdout
    assert re.search(r"config\s+key\s+eval\.shots;\s+default\s+\[0,\s+4,\s+16\]", helped.stdout)
    bad = run_script("--shots", "0,x", script="test.py")
    assert bad.returncode == 2 and "--shots takes comma-separated integers" in bad.stderr


@pytest.mark.parametrize("preset", ["cpu", "quick", "paper"])
def test_presets_load(preset):
    config = load_config(ROOT / "configs" / f"{preset}.yaml")
    assert config.name == preset and config.data.tasks


def test_generate_data_script(tmp_path):
    out = tmp_path / "data"
    args = ["--config", "configs/quick.yaml", "--tasks", "expression,parity", "--seed", "3", "--out", out, "--quiet"]
    r = run_script(*args)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 3 and list(manifest["tasks"]) == ["expression", "parity"]
    assert manifest["tasks"]["expression"]["files"]["train"]["counts"] == {"pattern": 256, "control": 64}
    before = {p: p.read_bytes() for p in out.rglob("*.json*")}
    r = run_script(*args)  # same arguments: nothing to do, nothing rewritten
    assert r.returncode == 0 and "nothing to do" in r.stdout
    assert before == {p: p.read_bytes() for p in out.rglob("*.json*")}
    r = run_script(*args[:-2], "--seed", "4", "--out", out, "--quiet")  # other settings: refused
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr
    assert before == {p: p.read_bytes() for p in out.rglob("*.json*")}
    r = run_script("--tasks", "expression,nope", "--out", tmp_path / "x")
    assert r.returncode == 2 and "unknown task 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = run_script("data.train_patern=5", "--out", tmp_path / "x")
    assert r.returncode == 2 and "did you mean 'train_pattern'" in r.stderr
    r = run_script("--help")
    assert r.returncode == 0 and "--seed" in r.stdout and "KEY=VALUE" in r.stdout


def test_data_folder_is_a_dataset(make_data, tmp_path):
    """One schema for every task (meta as a JSON string), a dataset card whose front matter lets
    datasets load the folder (all tasks, or one), save_to_disk, and items that read back unchanged."""
    from datasets import load_dataset

    from iclvsft.data import load_items

    data = make_data(SMALL)
    card = (data / "README.md").read_text()
    assert card.startswith("---\n") and "config_name: all" in card and "`split`: `pattern` or `control`" in card
    everything = load_dataset(str(data))
    manifest = json.loads((data / "manifest.json").read_text())
    for pool in ("train", "test"):
        assert everything[pool].num_rows == sum(t["files"][pool]["rows"] for t in manifest["tasks"].values())
        assert set(everything[pool]["task"]) == set(manifest["tasks"])
    one = load_dataset(str(data), "expression")
    row = one["test"][0]
    item = load_items(data, "expression", "test")[0]
    assert row["id"] == item.id and json.loads(row["meta"]) == item.meta and isinstance(item.meta, dict)
    everything.save_to_disk(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "dataset_dict.json").is_file()


def test_regenerating_with_fewer_tasks_removes_the_tasks_it_no_longer_writes(tmp_path):
    """--force with fewer tasks used to leave the old task folders, which datasets.load_dataset then read
    although the manifest no longer lists them. Files of other names stay."""
    import datasets

    small = ["data.train_pattern=8", "data.train_control=4", "data.test_pattern=4", "data.test_control=4"]
    generate(load_config(None, [*small, "data.tasks=[expression,relation]"]), tmp_path, show_progress=False)
    (tmp_path / "relation" / "notes.txt").write_text("mine")
    generate(load_config(None, [*small, "data.tasks=[expression,boolean]"]), tmp_path, show_progress=False)
    assert not (tmp_path / "relation" / "train.jsonl").exists() and (tmp_path / "relation" / "notes.txt").exists()
    generate(load_config(None, [*small, "data.tasks=[expression]"]), tmp_path, show_progress=False)
    assert not (tmp_path / "boolean").exists()  # its files gone, then its empty folder
    assert sorted(p.parent.name for p in tmp_path.glob("*/*.jsonl")) == ["expression", "expression"]
    tasks = set(datasets.load_dataset(str(tmp_path), split="test")["task"])
    assert tasks == {"expression"}
