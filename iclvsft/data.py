"""The data layer: train/test pools per task, de-duplicated and disjoint, with a manifest.

Layout of a data folder::

    <out>/<task>/train.jsonl   train pool: FT rows and ICL demonstrations (pattern rows, then control)
    <out>/<task>/test.jsonl    test pool (pattern, then control)
    <out>/manifest.json        counts, seeds, config, sha256 of every file, overlap check, and for a
                               task that runs its programs (code) the sandbox layers they ran in

Generation order is fixed (train before test, pattern before control) and each item comes from its
own RNG ``(seed, task, pool, split, index)``. An item whose normalised question was already drawn
(in the same pool, or in train when drawing test) is skipped and the next index is drawn, so test is
disjoint from train by construction; the manifest records the re-checked overlap (must be 0).
Same config, same bytes.

Programs run only in a fully contained sandbox: where an OS layer is missing, generation stops with
one line unless ``data.sandbox_degraded_ok`` (:mod:`iclvsft.sandbox`); ``sandbox_statement`` words
what the manifest records, for a report.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import __version__, sandbox
from .cards import dataset_card
from .config import Config, DataConfig
from .errors import DataError
from .io import atomic_write_text, dumps_json, git_commit, progress, read_jsonl, sha256_file, write_jsonl
from .scoring import FORMATS
from .tasks import POOLS, TASKS, Item, Task, get_task

GENERATE_HINT = "generate the data with `python generate_data.py --out <folder>` (or fix --data)"


def normalise_question(question: str) -> str:
    """The key for duplicate and overlap checks: whitespace collapsed, case kept."""
    return re.sub(r"\s+", " ", question).strip()


def pool_sizes(config: Config, task: Task, pool: str) -> dict[str, int]:
    data = config.data
    return {split: getattr(data, f"{pool}_{split}") for split in task.splits}


def generate_pool(task: Task, seed: int, pool: str, split: str, n: int, seen: set[str],
                  progress: tqdm | None = None, distribution: str = "ours") -> list[Item]:
    """``n`` items whose normalised questions are not in ``seen`` (which is updated)."""
    items: list[Item] = []
    index, limit = 0, 20 * n + 1000
    while len(items) < n:
        if index >= limit:
            raise DataError(f"{task.name}/{pool}/{split}: only {len(items)} distinct questions in {limit} draws "
                            f"(asked for {n}); lower the pool size or widen data.task_params.{task.name}")
        item = task.make_item(seed, pool, split, index, distribution)
        index += 1
        key = normalise_question(item.question)
        if key in seen:
            continue
        seen.add(key)
        items.append(item)
        if progress is not None:
            progress.update(1)
    return items


def check_items(task: Task, items: list[Item]) -> None:
    """The invariants every generated item must meet, re-checked before anything is written."""
    fmt = FORMATS[task.answer_format]
    for item in items:
        if fmt.strict(item.answer) != item.answer:
            raise DataError(f"{item.id}: gold answer {item.answer!r} is not in canonical {fmt.name} form")
        same = item.shortcut_answer == item.answer
        if item.meta.get("distribution") == "authors":  # their splits do not keep ours (docs/authors-data.md)
            continue
        if (item.split == "pattern") != same:
            raise DataError(f"{item.id}: shortcut_answer {item.shortcut_answer!r} vs answer {item.answer!r} "
                            f"breaks the {item.split} split's definition")
    bad = task.verify(items)
    if bad:
        raise DataError(f"{task.name}: {len(bad)} items fail the independent answer check, e.g. {bad[:5]}")


def generate_task(task: Task, config: Config, progress: tqdm | None = None) -> dict[str, list[Item]]:
    seed, distribution = config.data.seed, config.data.distribution
    seen: set[str] = set()
    pools = {}
    for pool in POOLS:  # train first: test items skip every train question
        items = []
        for split, n in pool_sizes(config, task, pool).items():
            items += generate_pool(task, seed, pool, split, n, seen, progress, distribution)
        check_items(task, items)
        pools[pool] = items
    return pools


def overlap(train: list[Item], test: list[Item]) -> int:
    train_q = {normalise_question(i.question) for i in train}
    return sum(normalise_question(i.question) in train_q for i in test)


def generate(config: Config, out: str | Path, show_progress: bool = True) -> dict[str, Any]:
    """Generate every task of ``config`` into ``out``; return the manifest (also written there)."""
    out = Path(out)
    data = config.data
    tasks = {name: get_task(name, data.task_params.get(name)) for name in data.tasks}
    total = sum(sum(pool_sizes(config, t, p).values()) for t in tasks.values() for p in POOLS)
    manifest: dict[str, Any] = {
        "generator": GENERATOR,
        "git_commit": git_commit(),
        "seed": data.seed,
        "data_config": data_config(data),
        "tasks": {},
    }
    files: dict[str, bytes] = {}
    with progress(total=total, desc="generating items", unit="item", disable=not show_progress) as bar:
        for name, task in tasks.items():
            bar.set_postfix_str(name)
            with sandbox.session(degraded_ok=data.sandbox_degraded_ok) as ran:
                pools = generate_task(task, config, bar)
            entry: dict[str, Any] = {"params": task.config.to_dict(), "splits": list(task.splits), "files": {}}
            if (layers := ran.layers()) is not None:
                entry["sandbox"] = {"active": list(layers.active), "missing": list(layers.missing),
                                    "degraded_ok": data.sandbox_degraded_ok}
            for pool, items in pools.items():
                rel = f"{name}/{pool}.jsonl"
                counts = {s: sum(i.split == s for i in items) for s in task.splits}
                entry["files"][pool] = {"path": rel, "counts": counts, "rows": len(items)}
                files[rel] = items
            entry["overlap_test_train"] = overlap(pools["train"], pools["test"])
            if entry["overlap_test_train"]:
                raise DataError(f"{name}: {entry['overlap_test_train']} test questions also appear in train")
            manifest["tasks"][name] = entry
    manifest["overlap_total"] = sum(t["overlap_test_train"] for t in manifest["tasks"].values())
    remove_stale_tasks(out, set(tasks))
    for rel, items in files.items():
        write_jsonl(out / rel, (i.to_row() for i in items))
        name, pool = rel.split("/")[0], rel.split("/")[1].removesuffix(".jsonl")
        manifest["tasks"][name]["files"][pool]["sha256"] = sha256_file(out / rel)
    atomic_write_text(out / "manifest.json", dumps_json(manifest))
    atomic_write_text(out / "README.md", str(dataset_card(manifest, tasks, POOLS, sandbox_statement(manifest))))
    return manifest


def remove_stale_tasks(out: Path, keep: set[str]) -> None:
    """Regenerating into a folder: the files of tasks its old manifest lists and the new data does not
    (``datasets.load_dataset`` would otherwise read tasks the manifest no longer has). Only those pools'
    files go; a task folder is removed once empty, never with anything else in it."""
    old = out / "manifest.json"
    try:
        listed = json.loads(old.read_text()).get("tasks", {}) if old.is_file() else {}
    except (OSError, ValueError):
        return
    for name in listed:
        if name in keep or name not in TASKS:  # a task name only: nothing else is ever removed
            continue
        for pool in POOLS:
            (out / name / f"{pool}.jsonl").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (out / name).rmdir()


def data_config(data: DataConfig) -> dict[str, Any]:
    """The data section as the manifest records it: without task_params (recorded per task), without
    ``distribution`` when it is the default ``ours``, so default data keeps its bytes, and without
    ``sandbox_degraded_ok`` (no item depends on it; each task's ``sandbox`` entry records it)."""
    return {k: v for k, v in data.to_dict().items()
            if k not in ("task_params", "sandbox_degraded_ok") and not (k == "distribution" and v == "ours")}


def sandbox_statement(manifest: dict[str, Any]) -> str:
    """One line per task whose answers were confirmed by running its programs: the sandbox layers they
    ran in, as a report states them ("" when no task ran programs)."""
    lines = []
    for name, entry in manifest.get("tasks", {}).items():
        layers = entry.get("sandbox") if isinstance(entry, dict) else None
        if not isinstance(layers, dict):
            continue
        active = "; ".join(layers.get("active", []))
        if layers.get("missing"):
            lines.append(f"{name}: programs ran in a DEGRADED sandbox, allowed by data.sandbox_degraded_ok (missing: "
                         f"{'; '.join(layers['missing'])}; active: {active})")
        else:
            lines.append(f"{name}: programs ran with every sandbox layer up ({active})")
    return "\n".join(lines)


def planned_manifest_key(config: Config) -> dict[str, Any]:
    """What decides the bytes of a data folder: the data section with each task's resolved params."""
    data = config.data
    return {"seed": data.seed, "data_config": data_config(data),
            "params": {n: get_task(n, data.task_params.get(n)).config.to_dict() for n in data.tasks}}


def existing_manifest_key(manifest: dict[str, Any]) -> dict[str, Any]:
    return {"seed": manifest.get("seed"), "data_config": manifest.get("data_config"),
            "params": {n: t.get("params") for n, t in manifest.get("tasks", {}).items()}}


GENERATOR = f"iclvsft {__version__}"


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of ``data_dir``, its shape checked, made by this version of the generators."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"no manifest at {path}; {GENERATE_HINT}")
    regenerate = "regenerate with generate_data.py --force"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; {regenerate}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is corrupt ({e.msg}); {regenerate}") from None
    tasks = manifest.get("tasks") if isinstance(manifest, dict) else None
    if not isinstance(tasks, dict):
        raise DataError(f"{path} has no 'tasks' mapping; {regenerate}")
    for name, entry in tasks.items():
        files = entry.get("files") if isinstance(entry, dict) else None
        ok = isinstance(files, dict) and all(
            isinstance(files.get(pool), dict) and isinstance(files[pool].get("sha256"), str)
            and isinstance(files[pool].get("path"), str) for pool in POOLS)
        if not ok:
            raise DataError(f"{path}: task {name!r} lacks files.train/test with path and sha256; {regenerate}")
    if manifest.get("generator") != GENERATOR:
        raise DataError(f"{path} was made by {manifest.get('generator')!r}, these generators are {GENERATOR!r}: the "
                        f"items may differ; {regenerate}")
    return manifest


def is_up_to_date(config: Config, data_dir: str | Path) -> bool:
    """True when ``data_dir`` holds exactly what ``config`` would generate (manifest and hashes agree)."""
    try:
        manifest = load_manifest(data_dir)
    except DataError:
        return False
    if existing_manifest_key(manifest) != planned_manifest_key(config):
        return False
    if not config.data.sandbox_degraded_ok and any(t.get("sandbox", {}).get("missing") for t in manifest["tasks"].values()):
        return False  # checked in a degraded sandbox, which this config does not allow
    return all((Path(data_dir) / f["path"]).is_file() and sha256_file(Path(data_dir) / f["path"]) == f["sha256"]
               for t in manifest["tasks"].values() for f in t["files"].values())


def load_items(data_dir: str | Path, task: str, pool: str, split: str | None = None,
               verify: bool = True) -> list[Item]:
    """Items of one pool (optionally one split), checked against the manifest's sha256."""
    if pool not in POOLS:
        raise DataError(f"pool must be one of {POOLS}, got {pool!r}")
    path = Path(data_dir) / task / f"{pool}.jsonl"
    if verify:
        manifest = load_manifest(data_dir)
        entry = manifest.get("tasks", {}).get(task)
        if entry is None:
            raise DataError(f"task {task!r} is not in {data_dir}/manifest.json (it has {sorted(manifest.get('tasks', {}))}); "
                            f"{GENERATE_HINT} with this task")
        expected = entry["files"][pool]["sha256"]
        if path.is_file() and sha256_file(path) != expected:
            raise DataError(f"{path} does not match the sha256 in its manifest (edited or corrupt); "
                            "regenerate with generate_data.py --force")
    items = [Item.from_dict(row, where=f"{path}:{n}") for n, row in read_jsonl(path, GENERATE_HINT)]
    for item in items:
        if item.task != task:
            raise DataError(f"{path}: row {item.id} belongs to task {item.task!r}")
    return [i for i in items if split is None or i.split == split]
