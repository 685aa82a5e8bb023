"""Model and dataset cards (``README.md`` of a fine-tuned model and of a data folder), built with
huggingface_hub's ``ModelCard``/``ModelCardData`` and ``DatasetCard``/``DatasetCardData``: the front
matter is the Hub's metadata (``base_model`` an upstream Hub id, never a local alias or path; this
project's own fields under ``iclvsft``), the text says how the artefact was made and cites the paper.
"""
from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData

from . import __version__
from .config import Config
from .io import atomic_write_text

PAPER_ARXIV = "2410.04691"
CITATION = """@inproceedings{yin-etal-2024-deeper,
  title = {Deeper Insights Without Updates: The Power of In-Context Learning Over Fine-Tuning},
  author = {Yin, Qingyu and He, Xuzheng and Leong, Chak Tou and Wang, Fan and Yan, Yanzhao and Shen, Xiaoyu and Zhang, Qiang},
  booktitle = {Findings of the Association for Computational Linguistics: EMNLP 2024},
  year = {2024},
  pages = {4138--4151},
  doi = {10.18653/v1/2024.findings-emnlp.239},
  eprint = {2410.04691},
  archivePrefix = {arXiv},
}"""
TAGS = ["iclvsft", "implicit-patterns", f"arxiv:{PAPER_ARXIV}"]


def repository_url() -> str | None:
    """The project's repository URL as the installed package declares it (a Project-URL), else None."""
    try:
        urls = metadata.metadata("iclvsft").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        return None
    return next((u.split(",", 1)[1].strip() for u in urls if "," in u), None)


def _made_by(tool: str) -> str:
    url = repository_url()
    name = f"[iclvsft]({url})" if url else "iclvsft"
    return f"Made by {name} {__version__} ({tool})"


def _citation_section() -> list[str]:
    return ["## Citation", "", "The study this reimplements (Yin et al., EMNLP 2024 Findings, "
            f"[arXiv {PAPER_ARXIV}](https://arxiv.org/abs/{PAPER_ARXIV})):", "", "```bibtex", CITATION, "```", ""]


def upstream_id(model_info: dict, config_model: str) -> str | None:
    """The Hub id of a run's base model: an offline model's upstream release, a hub id as given, else None
    (the built-in tiny model and local folders have none)."""
    from .models import OFFLINE_MODELS

    source = model_info.get("source")
    if source == "offline":
        return OFFLINE_MODELS[model_info.get("name", config_model)].upstream
    return config_model if source == "hub" else None


def model_card(config: Config, summary: dict, results: dict | None = None) -> ModelCard:
    """The card of a fine-tuned model: base model and provenance, data hashes, hyper-parameters, the final
    loss (4 significant digits; the exact value is in summary.json) and, given ``results`` (task ->
    {split: accuracy}), the zero-shot scores."""
    ft, info = config.ft, summary["model_info"]
    local = info.get("name", config.model)
    upstream = upstream_id(info, config.model)
    ours: dict[str, Any] = {"version": __version__, "base_model_local": local, "base_model_path": info.get("path"),
                            "tasks": list(ft.tasks), "n_train": ft.n_train, "method": ft.method}
    if info.get("source") == "offline":
        ours.update(gguf_file=info.get("gguf_file"), gguf_sha256=info.get("sha256"))
    data = ModelCardData(base_model=upstream, library_name="peft" if ft.method == "lora" else "transformers",
                         pipeline_tag="text-generation", tags=[*TAGS, ft.method], iclvsft=ours)
    if info.get("source") == "offline":
        provenance = (f"the offline GGUF `{info.get('gguf_file')}` (sha256 `{info.get('sha256')}`) of "
                      f"`{upstream}`, dequantised to safetensors: the weights trained on here are that quantised "
                      "copy, not the original release")
    else:
        provenance = f"{info.get('source')} `{info.get('path')}`"
    hyper = {k: getattr(ft, k) for k in ("method", "loss_on", "append_eos", "epochs", "max_steps", "learning_rate",
                                         "lr_scheduler", "warmup_steps", "weight_decay", "optimizer", "batch_size",
                                         "max_length", "train_seed")}
    if ft.method == "lora":
        hyper["lora"] = ft.lora.to_dict()
    loss = summary["final_loss"]
    lines = [f"# {local} fine-tuned on {', '.join(ft.tasks)} (N = {ft.n_train} rows per task)", "",
             f"{_made_by('`iclvsft finetune`')}: the in-context learning vs fine-tuning study of Yin et al. "
             "(EMNLP 2024 Findings) on implicit-pattern tasks.", "",
             f"* **Base model**: `{upstream or local}`, {provenance}.",
             f"* **Data**: the first {ft.n_train} pattern rows of each task's train pool, prompt format "
             f"`{config.prompt_format}`, prompt style `{config.prompt_style}`, rows `{ft.rows}` (" + ", ".join(
                 f"{t}: train.jsonl sha256 `{r['train_sha256']}`" for t, r in summary["data"]["tasks"].items()) + ").",
             "* **Hyper-parameters**: " + ", ".join(f"{k} = {v}" for k, v in hyper.items()) + ".",
             f"* **Training**: {summary['steps']} optimizer steps, final loss "
             f"{'n/a' if loss is None else f'{loss:.4g}'}, precision {summary['precision'].get('dtype')}.", ""]
    if results:
        lines += ["## Zero-shot results (strict accuracy, %)", "", "| task | pattern | control |", "|---|---|---|"]
        lines += [f"| {t} | {r.get('pattern', '–')} | {r.get('control', '–')} |" for t, r in results.items()]
        lines.append("")
    if ft.method == "lora":
        lines += ["## Loading", "", "```python",
                  "from iclvsft.models import load_model",
                  'model = load_model("<this folder>").model   # the base as trained on here, adapter applied',
                  "from peft import AutoPeftModelForCausalLM",
                  'model = AutoPeftModelForCausalLM.from_pretrained("<this folder>")   # base from the Hub', "```", ""]
    lines += ["The full resolved config is in `run_config.json`, the training log in `train_log.jsonl`, the run's "
              "record in `summary.json`.", "", *_citation_section()]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(out: Path, config: Config, summary: dict, results: dict | None = None) -> None:
    """README.md of a fine-tuned model (replacing peft's blank template), written atomically."""
    atomic_write_text(Path(out) / "README.md", str(model_card(config, summary, results)))


def dataset_card(manifest: dict[str, Any], tasks: dict, pools: tuple[str, ...] = ("train", "test"),
                 sandbox: str = "") -> DatasetCard:
    """The card of a data folder, whose front matter makes the folder a dataset
    (``datasets.load_dataset(folder)``: every task; ``load_dataset(folder, "expression")``: one).

    The column ``split`` (pattern / control) keeps its name: it is this project's vocabulary (every file
    and report), while a dataset's splits here are the pools, ``train`` and ``test``, so the two never
    meet in one API call; the card says so."""
    names = list(manifest["tasks"])
    configs = [{"config_name": "all", "default": True,
                "data_files": [{"split": p, "path": f"*/{p}.jsonl"} for p in pools]}]
    configs += [{"config_name": n, "data_files": [{"split": p, "path": f"{n}/{p}.jsonl"} for p in pools]} for n in names]
    ours = {"version": __version__, "seed": manifest["seed"]}
    if manifest.get("git_commit"):
        ours["git_commit"] = manifest["git_commit"]
    data = DatasetCardData(license="mit", task_categories=["text-generation", "question-answering"], language=["en"],
                           pretty_name="iclvsft implicit-pattern tasks", tags=TAGS, configs=configs, iclvsft=ours)
    rows = []
    for n in names:
        t = manifest["tasks"][n]
        counts = ", ".join(f"{p} {sum(f['counts'].values())} ({', '.join(f'{s} {c}' for s, c in f['counts'].items())})"
                           for p, f in t["files"].items())
        doc = (sys.modules[type(tasks[n]).__module__].__doc__ or n).strip().splitlines()[0]
        rows.append(f"| {n} | {doc} | {counts} |")
    commit = f", git commit `{manifest['git_commit']}`" if manifest.get("git_commit") else ""
    sandbox_lines = ["Answers confirmed by running programs in a sandbox:", "",
                     *(f"* {line}" for line in sandbox.splitlines()), ""] if sandbox else []
    lines = ["# iclvsft: implicit-pattern tasks", "",
             f"{_made_by('`iclvsft generate`, the same as `python generate_data.py`')}{commit}, with data seed "
             f"{manifest['seed']}; `manifest.json` holds every parameter and the sha256 of every file. Same seed and "
             "parameters, same bytes. License: MIT.", "",
             "Each task has a `pattern` part (a shortcut gives the answer: `shortcut_answer == answer`) and, except "
             "parity, a `control` part (same surface form, the shortcut fails). A model that is right on pattern but "
             "answers `shortcut_answer` on control learned the shortcut.", "",
             "| task | what it is | rows |", "|---|---|---|", *rows, "", *sandbox_lines,
             "## Loading", "", "```python", "from datasets import load_dataset",
             'ds = load_dataset("<this folder>")                 # every task: splits train / test',
             'ds = load_dataset("<this folder>", "expression")   # one task',
             'ds.save_to_disk("<out>")', "```", "",
             "## Fields", "",
             "* `id`: `<task>-<pool>-<split>-<index>`, stable.",
             "* `task`: the task name.",
             "* `split`: `pattern` or `control` (this project's name; not the dataset split, which is the pool: "
             "`train` for fine-tuning rows and ICL demonstrations, `test` for evaluation; no test question appears "
             "in train).",
             "* `question`, `answer`: the question text and its gold answer (computed, then re-derived by a second "
             "route in the tests).",
             "* `shortcut_answer`: what the shortcut predicts (null where none exists: algebra's control).",
             "* `meta`: a JSON string with every generation parameter of the item, its seed and index (its fields "
             "differ per task, hence a string: one schema for every task).", "", *_citation_section()]
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
