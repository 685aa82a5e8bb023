"""Fine-tuning (iclvsft/train/, finetune.py) on the tiny random Qwen2, CPU only.

What must hold: prompt tokens carry label -100 and every row keeps a label token after
truncation; the three batchings give the same loss on the same rows (padding-free packing is exact);
the loss falls on a repeated small batch; LoRA leaves the base bit-identical and changes the adapter,
and the saved adapter reproduces the in-memory logits; a full run saves a loadable model; an
interrupted run resumes to the same log as an uninterrupted one; a finished run is not overwritten
unless asked; `accelerate launch` with two processes completes and saves once; ft.optimizer is
checked at load (name and package), and torchao's 8-bit AdamW trains full FT over fp32 master weights
or bf16 weights (stochastic rounding) and resumes from its checkpoint exactly.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, free_port, run_all

from iclvsft import train
from iclvsft.config import BATCHING, LR_SCHEDULERS, load_config
from iclvsft.errors import ConfigError, DataError
from iclvsft.models import build_tiny_model, load_model

TINY = "tiny-random-qwen2"


@pytest.fixture(scope="module")
def data_dir(make_data):
    # its own sizes: test_select_rows_first_n_and_mixed counts on exactly 48 pattern rows
    return make_data(["data.tasks=[expression,boolean]", "data.train_pattern=48", "data.train_control=4",
                      "data.test_pattern=4", "data.test_control=4"])


def tiny_config(*overrides: str) -> dict:
    """A fast tiny-model config: 8 rows of expression, batch 4 = 2 x 2 accumulation, fp32."""
    return load_config(None, [f"model={TINY}", "ft.tasks=[expression]", "ft.n_train=8", "ft.per_device_batch_size=2",
                              "ft.batch_size=4", "ft.max_steps=4", "ft.save_steps=0", "ft.learning_rate=0.01",
                              *overrides])


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / train.LOG_FILE).read_text().splitlines()]


def tiny_tokenizer():
    return load_model(TINY).tokenizer


# ----------------------------------------------------------------------------------------------
# rows, tokens, collators
# ----------------------------------------------------------------------------------------------


def hide_package(monkeypatch, prefix: str) -> None:
    """Make every module whose name starts with ``prefix`` look not installed (importlib's find_spec)."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith(prefix) else real_find_spec(name, *a))

def test_select_rows_first_n_and_mixed(data_dir):
    rows, record = train.select_rows(data_dir, ["expression"], 5)
    assert [r["id"] for r in rows] == [f"expression-train-pattern-{i:05d}" for i in range(5)]
    again, _ = train.select_rows(data_dir, ["expression"], 8)
    assert again[:5] == rows  # same N, same rows; a larger N extends them
    assert set(rows[0]) == {"id", "task", "prompt", "completion"}
    assert record["tasks"]["expression"]["train_sha256"]

    mixed, rec = train.select_rows(data_dir, ["expression", "boolean"], 6, seed=1)
    assert sorted(r["task"] for r in mixed).count("boolean") == 6 and len(mixed) == 12
    assert [r["task"] for r in mixed] != ["expression"] * 6 + ["boolean"] * 6  # shuffled
    assert mixed == train.select_rows(data_dir, ["expression", "boolean"], 6, seed=1)[0]
    assert mixed != train.select_rows(data_dir, ["expression", "boolean"], 6, seed=2)[0]
    assert rec["rows"] == 12

    with pytest.raises(DataError, match="holds 48 pattern rows"):
        train.select_rows(data_dir, ["expression"], 49)


def test_labels_mask_the_prompt_and_end_with_eos(data_dir):
    tok = tiny_tokenizer()
    rows, _ = train.select_rows(data_dir, ["expression"], 3)
    feats, stats = train.tokenize_rows(rows, tok, loss_on="completion", max_length=512)
    for row, f in zip(rows, feats):
        prompt = tok(row["prompt"], add_special_tokens=True)["input_ids"]
        completion = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert f["input_ids"] == prompt + completion  # the prompt exactly as evaluation encodes it
        assert f["labels"] == [-100] * len(prompt) + completion
    assert stats["label_tokens"] == sum(sum(l != -100 for l in f["labels"]) for f in feats)

    seq, _ = train.tokenize_rows(rows, tok, loss_on="sequence", max_length=512, append_eos=False)
    assert all(f["labels"] == f["input_ids"] for f in seq)
    assert all(f["input_ids"][-1] != tok.eos_token_id for f in seq)


def test_truncation_keeps_a_label_token_or_fails_naming_the_row(data_dir):
    tok = tiny_tokenizer()
    rows, _ = train.select_rows(data_dir, ["expression"], 2)
    prompt_len = len(tok(rows[0]["prompt"])["input_ids"])
    feats, stats = train.tokenize_rows(rows[:1], tok, max_length=prompt_len + 1)  # one answer token left
    assert len(feats[0]["input_ids"]) == prompt_len + 1 and stats["truncated_rows"] == 1
    assert sum(l != -100 for l in feats[0]["labels"]) == 1
    with pytest.raises(DataError, match=rows[0]["id"]):
        train.tokenize_rows(rows[:1], tok, max_length=prompt_len)
    # the whole-sequence loss still has prompt labels to train on
    train.tokenize_rows(rows[:1], tok, max_length=prompt_len, loss_on="sequence")


def test_padding_free_padded_and_max_length_give_the_same_loss(data_dir):
    """Packing is exact: no attention across rows, positions restart per row (SDPA, CPU)."""
    loaded = load_model(TINY, attn_implementation="sdpa")
    model, tok = loaded.model, loaded.tokenizer
    assert model.config.use_cache  # as loaded for generation: the collator must switch the cache off itself
    rows, _ = train.select_rows(data_dir, ["expression", "boolean"], 3, seed=0)
    feats, _ = train.tokenize_rows(rows, tok, loss_on="completion", max_length=128)
    assert len({len(f["input_ids"]) for f in feats}) > 1  # rows of different lengths
    losses, grads = {}, {}
    for batching in BATCHING:
        batch = train.make_collator(batching, tok.pad_token_id, 128, "sdpa")(feats)
        if batching == "padding_free":
            assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
            assert (batch["position_ids"] == 0).sum() == len(feats)
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        losses[batching] = loss.item()
        grads[batching] = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    ref = losses["padded"]
    assert losses["padding_free"] == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert losses["max_length"] == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert torch.allclose(grads["padding_free"], grads["padded"], atol=1e-5)
    # the output layer only where a label is (ft.logits_on=labels): the same loss and gradients
    for loss_on in ("completion", "sequence"):
        feats_l, _ = train.tokenize_rows(rows, tok, loss_on=loss_on, max_length=128)
        for batching in ("padding_free", "padded"):
            results = {}
            for logits_on in ("all", "labels"):
                batch = train.make_collator(batching, tok.pad_token_id, 128, "sdpa", logits_on)(feats_l)
                n_items = (train.next_token_targets(batch["labels"]) != -100).sum()
                model.zero_grad()
                if logits_on == "labels":
                    out = model(**{k: v for k, v in batch.items() if k not in ("labels", train.KEPT_TARGETS)})
                    assert out.logits.shape[:-1] == batch[train.KEPT_TARGETS].shape  # one per kept position
                    assert (batch[train.KEPT_TARGETS] != -100).sum() == n_items
                    loss = train.labelled_logits_loss(out, batch[train.KEPT_TARGETS], num_items_in_batch=n_items)
                else:
                    loss = model(**batch, num_items_in_batch=n_items).loss
                loss.backward()
                results[logits_on] = (loss.item(), model.model.layers[1].mlp.down_proj.weight.grad.clone())
            assert results["labels"][0] == pytest.approx(results["all"][0], rel=1e-5), (loss_on, batching)
            assert torch.allclose(results["labels"][1], results["all"][1], atol=1e-6), (loss_on, batching)
    # negative control: the same flat sequence with positions running on lets rows see each other
    flat = train.make_collator("padding_free", tok.pad_token_id, 128)(feats)
    leaky = model(input_ids=flat["input_ids"], labels=flat["labels"], use_cache=False).loss.item()
    assert abs(leaky - ref) > 1e-3
    # ... and so do restarting positions when a KV cache is built (why the batch carries use_cache=False)
    leaky = model(**{**flat, "use_cache": True}).loss.item()
    assert abs(leaky - ref) > 1e-3


def test_kept_positions_are_an_index_padded_to_the_bucket():
    """The labelled-logits collator picks positions on the CPU as an int64 (batch, K) index with their
    targets; the batch's slots (batch x K) are a multiple of the bucket (K itself for a padding-free
    batch); the padding slots repeat the row's last kept position with target -100 (ignored by the loss)."""
    bucket = train.LOGITS_BUCKET
    for counts in ([1], [bucket], [bucket + 1], [3, 0], [3, 0, 70, 9], [2 * bucket, 5]):
        length = max(counts) + 7
        labels = torch.full((len(counts), length), -100)
        for row, n in enumerate(counts):  # n labels at the row's end: kept positions length-n-1 .. length-2
            labels[row, length - n:] = torch.arange(n) + 10
        index, targets = train.kept_positions(labels)
        step = bucket // len(counts)
        assert index.dtype == targets.dtype == torch.long and index.shape == targets.shape
        assert index.numel() % bucket == 0, counts
        assert index.shape == (len(counts), -(-max(counts) // step) * step), counts  # no more than needed
        shifted = train.next_token_targets(labels)
        for row, n in enumerate(counts):
            real = (shifted[row] != -100).nonzero().squeeze(-1)
            assert torch.equal(index[row, :n], real) and torch.equal(targets[row, :n], shifted[row, real])
            assert (targets[row, n:] == -100).all()
            assert (index[row, n:] == (real[-1] if n else 0)).all()
    # the collator on every batching (4 rows), and a bucket of another size
    loaded = load_model(TINY)
    rows = [{"id": f"r{i}", "task": "expression", "prompt": "1+2=" * (i + 1), "completion": "3" * (5 * i + 1)}
            for i in range(4)]
    feats, _ = train.tokenize_rows(rows, loaded.tokenizer, max_length=128)
    for batching in BATCHING:
        for size in (bucket, 8):
            collator = train.make_collator(batching, loaded.tokenizer.pad_token_id, 128, "sdpa", "labels")
            collator.bucket = size
            batch = collator(feats)
            keep = batch["logits_to_keep"]
            assert keep.ndim == 2 and keep.dtype == torch.long and keep.numel() % size == 0, (batching, size)
            assert keep.shape == batch[train.KEPT_TARGETS].shape
            assert (batch[train.KEPT_TARGETS] != -100).sum() == (train.next_token_targets(batch["labels"]) != -100).sum()


def _forward_keys(model):
    """The keyword arguments of every forward call of ``model``, recorded by a pre-hook."""
    seen = []
    model.register_forward_pre_hook(lambda _m, _args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    return seen


@pytest.mark.parametrize("batching", ["padding_free", "padded"])
@pytest.mark.parametrize("loss_on", ["completion", "sequence"])
def test_labelled_logits_step_equals_all_logits(data_dir, tmp_path, batching, loss_on):
    """One optimizer step of 8 rows in 2 passes (gradient accumulation) through the Trainer's
    ``compute_loss``: the loss and every parameter's gradient with the output layer at the kept
    positions (``ft.logits_on=labels``, bucket-padded index) equal those with it at every position
    (fp32). The kept targets never reach the model's forward."""
    from transformers import Trainer, TrainingArguments

    model = build_tiny_model()
    model.config.use_cache = False
    tok = tiny_tokenizer()
    rows, _ = train.select_rows(data_dir, ["expression", "boolean"], 4, seed=0)
    feats, _ = train.tokenize_rows(rows, tok, loss_on=loss_on, max_length=256)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4)
    seen = _forward_keys(model)
    results = {}
    for logits_on in ("all", "labels"):
        collator = train.make_collator(batching, tok.pad_token_id, 256, "sdpa", logits_on)
        batches = [collator(feats[:4]), collator(feats[4:])]
        trainer_class = train.LabelledLogitsTrainer if logits_on == "labels" else Trainer
        trainer = trainer_class(model=model, args=args, data_collator=collator,
                                compute_loss_func=train.labelled_logits_loss if logits_on == "labels" else None)
        n_items = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
        assert int(n_items) == sum(int((train.next_token_targets(b["labels"]) != -100).sum()) for b in batches)
        model.zero_grad()
        loss = 0.0
        for batch in batches:
            step = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_items)
            step.backward()
            loss += step.item()
        if logits_on == "labels":
            for batch, kwargs in zip(batches, seen[-2:]):
                assert batch["logits_to_keep"].numel() % train.LOGITS_BUCKET == 0
                assert (batch[train.KEPT_TARGETS] == -100).any()  # the bucket padding is exercised
                assert train.KEPT_TARGETS not in kwargs and "labels" not in kwargs
                assert kwargs["logits_to_keep"].dtype == torch.long
            if loss_on == "sequence" and batching == "padding_free":
                assert batches[0]["logits_to_keep"].shape[-1] > train.LOGITS_BUCKET  # several buckets
        results[logits_on] = (loss, {n: p.grad.clone() for n, p in model.named_parameters()})
    (loss_all, grads_all), (loss_kept, grads_kept) = results["all"], results["labels"]
    assert loss_kept == pytest.approx(loss_all, rel=1e-6, abs=1e-6)
    assert grads_kept.keys() == grads_all.keys()
    for name, grad in grads_all.items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(grads_kept[name], grad, rtol=1e-5, atol=1e-6), (name, (grads_kept[name] - grad).abs().max())


def test_labelled_logits_loss_refuses_full_length_labels():
    logits = torch.zeros(1, 64, 5)
    with pytest.raises(ValueError, match="LabelledLogitsTrainer"):
        train.labelled_logits_loss(type("Out", (), {"logits": logits})(), torch.zeros(1, 70, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------

def test_ft_config_checks():
    from transformers.trainer_utils import SchedulerType

    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}
    config = load_config(None, ["ft.lora.target_modules=[q_proj,v_proj]"])
    assert config.ft.lora.target_modules == ["q_proj", "v_proj"]
    for bad, match in [("ft.lora.target_modules=[1]", "string or a list"), ("ft.method=qlora", "ft.method"),
                       ("ft.loss_on=prompt", "ft.loss_on"), ("ft.batch_size=6", "multiple"),
                       ("ft.batching=packed", "ft.batching"), ("ft.tasks=[nope]", "unknown task"),
                       ("ft.lora.dropout=1.0", "dropout"), ("ft.lr_scheduler=step", "lr_scheduler")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, [bad])
    assert train.gradient_accumulation(load_config(None, []), world_size=2) == 2  # 16 = 4 x 2 x 2
    with pytest.raises(ConfigError, match="multiple"):
        train.gradient_accumulation(load_config(None, []), world_size=3)
    authors = load_config(ROOT / "configs" / "ft_authors.yaml").ft
    assert (authors.method, authors.learning_rate, authors.warmup_steps, authors.lr_scheduler,
            authors.batch_size, authors.max_steps, authors.loss_on, authors.n_train) == \
        ("full", 1e-5, 20, "constant_with_warmup", 16, 100, "sequence", 1000)
    assert authors.tasks == ["expression", "relation", "boolean", "code"]


# ----------------------------------------------------------------------------------------------
# training runs
# ----------------------------------------------------------------------------------------------

def test_loss_falls_on_a_repeated_small_batch(data_dir, tmp_path, capfd):
    config = tiny_config("ft.n_train=4", "ft.max_steps=25", "ft.method=full", "ft.learning_rate=0.003",
                         "ft.logging_steps=1")
    result = train.finetune(config, tmp_path / "run", data_dir, show_progress=True)
    printed = "".join(capfd.readouterr())
    assert "'loss'" not in printed and "loss=" in printed  # the loss on the progress bar, no dict per step
    # stderr is no terminal here: the bar writes plain lines (library bars, e.g. transformers' "Writing
    # model shards", are switched off by the scripts' entry point, not here)
    bar = [line for line in printed.split("\n") if "fine-tuning" in line]
    assert bar and all("\r" not in line and line.startswith("fine-tuning: ") for line in bar)
    losses = [e["loss"] for e in log_lines(tmp_path / "run")]
    assert len(losses) == 25
    assert losses[-1] < 0.5 * losses[0], losses
    assert result.summary["steps"] == 25 and result.summary["effective_batch_size"] == 4


def test_lora_base_bit_identical_adapter_changed_and_reloads(data_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    out = tmp_path / "lora"
    result = train.finetune(tiny_config(), out, data_dir, show_progress=False)
    model = result.model.eval()
    reference = build_tiny_model().state_dict()
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in model.state_dict().items() if "lora_" not in k}
    assert base.keys() == reference.keys()
    assert all(torch.equal(base[k], reference[k]) for k in reference)  # the base is bit-identical

    set_seed(0)  # the adapter as initialised (same seed, same config) vs as trained
    lora = tiny_config().ft.lora
    fresh = get_peft_model(build_tiny_model(), LoraConfig(r=lora.r, lora_alpha=lora.alpha,
                                                          lora_dropout=lora.dropout, target_modules="all-linear",
                                                          task_type="CAUSAL_LM")).state_dict()
    trained = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert trained and all(not torch.equal(v, fresh[k]) for k, v in trained.items())

    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / train.CHECKPOINT_DIR).exists()
    reloaded = load_model(TINY, adapter=str(out)).model
    ids = torch.tensor([list(range(10, 40)), list(range(40, 70))])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-6)
    summary = json.loads((out / train.SUMMARY_FILE).read_text())
    assert summary["steps"] == 4 and summary["provenance"]["versions"]["peft"]
    assert json.loads((out / train.RUN_CONFIG_FILE).read_text())["config"]["ft"]["n_train"] == 8
    # the model card is written from the run (not peft's blank template)
    card = (out / "README.md").read_text()
    assert "base_model:" not in card and "base_model_local: tiny-random-qwen2" in card  # no Hub id to name
    assert "N = 8 rows per task" in card and "learning_rate = " in card
    assert f"final loss {summary['final_loss']:.4g}" in card


def test_adapter_names_a_loadable_base_and_report_to_reaches_the_trainer(tmp_path):
    """An offline alias is not something peft can load: the saved adapter names the upstream Hub id (portable),
    which this project's loader maps back to the offline copy; ft.report_to goes to the Trainer."""
    from iclvsft.models.offline import adapter_base
    from iclvsft.train.run import point_adapter_at_base
    from iclvsft.train.setup import Precision, training_arguments

    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "qwen2.5-coder-0.5b-instruct"}))
    point_adapter_at_base(tmp_path, {"source": "offline", "name": "qwen2.5-coder-0.5b-instruct",
                                     "path": "/cache/models/qwen2.5-coder-0.5b-instruct"})
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert adapter_base(tmp_path) == "qwen2.5-coder-0.5b-instruct"
    for value, expected in (("none", []), ("tensorboard", ["tensorboard"]), ("[tensorboard]", ["tensorboard"])):
        config = load_config(None, [f"ft.report_to={value}"])
        args = training_arguments(config, tmp_path, Precision("float32", "float32", False, False), 1,
                                  torch.device("cpu"))
        assert args.report_to == expected


def test_report_to_is_checked_when_the_config_loads(monkeypatch):
    """ft.report_to: an unknown logger or one whose package is missing is one ConfigError at load (the
    scripts print it and exit 2 before any model loads); the names and the package check agree with
    transformers' own."""
    from transformers.integrations import integration_utils

    from iclvsft.reporting import REPORTERS, reporter_installed

    transformers_check = {"tensorboard": "is_tensorboard_available", "trackio": "is_trackio_available",
                          "wandb": "is_wandb_available", "mlflow": "is_mlflow_available",
                          "comet_ml": "is_comet_available", "clearml": "is_clearml_available",
                          "dvclive": "is_dvclive_available", "swanlab": "is_swanlab_available"}
    assert set(REPORTERS) == set(transformers_check) and set(REPORTERS) <= set(integration_utils.INTEGRATION_TO_CALLBACK)
    for name, check in transformers_check.items():
        assert reporter_installed(name) == bool(getattr(integration_utils, check)()), name
    with pytest.raises(ConfigError, match="unknown logger 'csv'; use none or one of tensorboard"):
        load_config(None, ["ft.report_to=csv"])
    hide_package(monkeypatch, "tensorboard")
    with pytest.raises(ConfigError, match=r"^ft.report_to=tensorboard needs the tensorboard package: pip install "
                                          r"tensorboard \(or ft.report_to=none\)$"):
        load_config(None, ["ft.report_to=[tensorboard]"])


def test_optimizer_names_and_packages_agree_with_transformers():
    """ft.optimizer's table (iclvsft.optimizers) holds exactly transformers' TrainingArguments.optim names,
    and its package check agrees with transformers' own where transformers has one."""
    from transformers.training_args import OptimizerNames
    from transformers.utils import import_utils

    from iclvsft.optimizers import OPTIMIZERS, STOCHASTIC_ROUNDING, optimizer_installed

    assert set(OPTIMIZERS) == {o.value for o in OptimizerNames}
    assert set(STOCHASTIC_ROUNDING) <= set(OPTIMIZERS)
    checks = {"adamw_torch_8bit": "is_torchao_available", "adamw_bnb_8bit": "is_bitsandbytes_available",
              "galore_adamw": "is_galore_torch_available", "apollo_adamw": "is_apollo_torch_available",
              "lomo": "is_lomo_available", "grokadamw": "is_grokadamw_available",
              "schedule_free_adamw": "is_schedulefree_available", "stable_adamw": "is_torch_optimi_available"}
    for name, check in checks.items():
        assert optimizer_installed(name) == bool(getattr(import_utils, check)()), name
    assert optimizer_installed("adamw_torch_8bit")  # torchao is pinned in requirements.txt


def test_optimizer_and_param_dtype_are_checked_when_the_config_loads(monkeypatch):
    """A bad ft.optimizer name, a missing package, or ft.param_dtype=bf16 without a stochastic-rounding
    optimizer, with LoRA, or with fp32 compute: one ConfigError line when the config loads (the scripts
    print it and exit 2 before any model loads)."""
    assert load_config(None, ["ft.optimizer=adamw_torch_4bit"]).ft.optimizer == "adamw_torch_4bit"
    full_bf16 = ["ft.method=full", "ft.optimizer=adamw_torch_8bit", "ft.param_dtype=bf16"]
    assert load_config(None, full_bf16).ft.param_dtype == "bf16"
    # runs recorded before the key existed (fp32 master weights) keep their identity
    assert "param_dtype" not in train.run_identity(load_config(None, ["ft.method=full"]), {})["ft"]
    assert train.run_identity(load_config(None, full_bf16), {})["ft"]["param_dtype"] == "bf16"
    with pytest.raises(ConfigError, match=r"^ft.optimizer: unknown optimizer 'adamw_nope'; use a transformers "
                                          r"TrainingArguments.optim name, e.g. adamw_torch_fused \(the default\) "
                                          r"or adamw_torch_8bit$"):
        load_config(None, ["ft.optimizer=adamw_nope"])
    with pytest.raises(ConfigError, match=r"^ft.param_dtype must be one of fp32, bf16, got 'fp16'$"):
        load_config(None, ["ft.param_dtype=fp16"])
    with pytest.raises(ConfigError, match=r"^ft.param_dtype=bf16 needs an optimizer that rounds its updates to bf16 "
                                          r"stochastically: ft.optimizer=adamw_torch_8bit or adamw_torch_4bit, got "
                                          r"adamw_torch_fused$"):
        load_config(None, ["ft.method=full", "ft.param_dtype=bf16"])
    with pytest.raises(ConfigError, match=r"^ft.param_dtype=bf16 applies to ft.method=full"):
        load_config(None, [*full_bf16, "ft.method=lora"])
    with pytest.raises(ConfigError, match=r"^ft.param_dtype=bf16 trains in bf16: it needs dtype bf16 or auto, got "
                                          r"dtype fp32$"):
        load_config(None, [*full_bf16, "dtype=fp32"])
    with pytest.raises(ConfigError, match=r"^ft.optimizer: unknown optimizer 'sgdx'"):  # a protocol's too
        load_config(None, ["reproduce.ft_protocols={x: {optimizer: sgdx}}"])
    hide_package(monkeypatch, "torchao")
    with pytest.raises(ConfigError, match=r"^ft.optimizer=adamw_torch_8bit needs the torchao package: pip install "
                                          r"torchao \(or ft.optimizer=adamw_torch_fused\)$"):
        load_config(None, ["ft.optimizer=adamw_torch_8bit"])


@pytest.mark.parametrize("param_dtype", ["fp32", "bf16"])
def test_low_precision_optimizer_trains_full_ft(data_dir, tmp_path, param_dtype):
    """Full FT with torchao's 8-bit AdamW under bf16 compute, over fp32 master weights or bf16 weights
    (stochastic rounding): the Trainer builds that optimizer, its moments are 8-bit, the weights keep
    their dtype, and the loss is finite and falls on a repeated small batch."""
    from torchao.optim import AdamW8bit
    from torchao.optim.subclass_8bit import OptimState8bit

    config = tiny_config("ft.n_train=4", "ft.max_steps=12", "ft.method=full", "ft.learning_rate=0.003", "dtype=bf16",
                         "ft.optimizer=adamw_torch_8bit", f"ft.param_dtype={param_dtype}")
    result = train.finetune(config, tmp_path / "run", data_dir, show_progress=False)
    losses = [e["loss"] for e in log_lines(tmp_path / "run")]
    assert len(losses) == 12 and all(map(math.isfinite, losses))
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses
    optimizer = result.trainer.optimizer.optimizer
    assert isinstance(optimizer, AdamW8bit) and optimizer.bf16_stochastic_round == (param_dtype == "bf16")
    assert any(isinstance(t, OptimState8bit) for st in optimizer.state.values() for t in st.values())
    want = torch.bfloat16 if param_dtype == "bf16" else torch.float32
    assert {p.dtype for p in result.model.parameters()} == {want}
    assert result.summary["precision"]["load_dtype"] == ("bfloat16" if param_dtype == "bf16" else "float32")


def test_tensorboard_events_survive_the_run_and_read_back(data_dir, tmp_path):
    """ft.report_to=tensorboard: the event files go to <out>/runs/, survive the removal of checkpoints/
    at the end of the run, and hold the same losses as train_log.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train.finetune(tiny_config("ft.report_to=tensorboard", "ft.save_steps=2"), out, data_dir, show_progress=False)
    assert not (out / "checkpoints").exists()
    events = EventAccumulator(str(out / train.REPORT_DIR))
    events.Reload()
    logged = [(e["step"], e["loss"]) for e in log_lines(out)]
    assert len(logged) == 4
    assert [(s.step, pytest.approx(s.value, rel=1e-6)) for s in events.Scalars("train/loss")] == logged


def test_full_finetune_saves_a_loadable_model(data_dir, tmp_path):
    out = tmp_path / "full"
    result = train.finetune(tiny_config("ft.method=full", "ft.max_steps=2"), out, data_dir, show_progress=False)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    reloaded = load_model(str(out)).model
    ids = torch.tensor([list(range(5, 25))])
    with torch.no_grad():
        assert torch.allclose(result.model.eval()(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-6)
        assert not torch.allclose(build_tiny_model()(input_ids=ids).logits, reloaded(input_ids=ids).logits)


class Crash(RuntimeError):
    pass


def test_interrupted_run_resumes_to_the_same_log(data_dir, tmp_path):
    from transformers import TrainerCallback

    class CrashAt(TrainerCallback):  # a kill after step 3 was logged, one step past the checkpoint at step 2
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step == 3:
                raise Crash("simulated kill after step 3")

    config = tiny_config("ft.max_steps=6", "ft.save_steps=2", "ft.lora.dropout=0.1")
    straight = train.finetune(config, tmp_path / "straight", data_dir, show_progress=False)
    out = tmp_path / "resumed"
    with pytest.raises(Crash):
        train.finetune(config, out, data_dir, callbacks=[CrashAt()], show_progress=False)
    assert not (out / train.SUMMARY_FILE).exists()
    assert (out / train.CHECKPOINT_DIR / "checkpoint-2").is_dir()
    assert [e["step"] for e in log_lines(out)] == [1, 2, 3]

    with pytest.raises(ConfigError, match="another config"):  # resuming needs the same settings
        train.finetune(tiny_config("ft.max_steps=6", "ft.save_steps=2", "ft.learning_rate=0.02"), out, data_dir,
                       show_progress=False)
    resumed = train.finetune(config, out, data_dir, show_progress=False)
    assert resumed.summary["resumed_from"].endswith("checkpoint-2")
    a, b = log_lines(tmp_path / "straight"), log_lines(out)
    assert [e["step"] for e in b] == [1, 2, 3, 4, 5, 6]  # step 3 redone once, no duplicate lines
    assert [e["loss"] for e in b] == pytest.approx([e["loss"] for e in a], rel=1e-5)
    assert resumed.summary["final_loss"] == pytest.approx(straight.summary["final_loss"], rel=1e-5)


def test_low_precision_run_resumes_with_its_8bit_state(data_dir, tmp_path):
    """Full FT with bf16 weights and torchao's 8-bit AdamW, killed after step 3: the checkpoint holds the
    quantized moments (tensor subclasses) and the RNG of the stochastic rounding, so the resumed run logs
    the losses of an uninterrupted one."""
    from transformers import TrainerCallback

    class CrashAt(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step == 3:
                raise Crash("simulated kill after step 3")

    config = tiny_config("ft.max_steps=6", "ft.save_steps=2", "ft.method=full", "dtype=bf16", "ft.learning_rate=0.003",
                         "ft.optimizer=adamw_torch_8bit", "ft.param_dtype=bf16")
    straight = train.finetune(config, tmp_path / "straight", data_dir, show_progress=False)
    out = tmp_path / "resumed"
    with pytest.raises(Crash):
        train.finetune(config, out, data_dir, callbacks=[CrashAt()], show_progress=False)
    resumed = train.finetune(config, out, data_dir, show_progress=False)
    assert resumed.summary["resumed_from"].endswith("checkpoint-2")
    a, b = log_lines(tmp_path / "straight"), log_lines(out)
    assert [e["step"] for e in b] == [1, 2, 3, 4, 5, 6]
    assert [e["loss"] for e in b] == pytest.approx([e["loss"] for e in a], rel=1e-5)
    assert resumed.summary["final_loss"] == pytest.approx(straight.summary["final_loss"], rel=1e-5)


def test_finished_run_is_refused_unless_overwrite(data_dir, tmp_path):
    out = tmp_path / "run"
    config = tiny_config("ft.max_steps=1")
    train.finetune(config, out, data_dir, show_progress=False)
    with pytest.raises(ConfigError, match="--overwrite"):
        train.finetune(config, out, data_dir, show_progress=False)
    stamp = (out / train.SUMMARY_FILE).stat().st_mtime_ns
    train.finetune(config, out, data_dir, overwrite=True, show_progress=False)
    assert (out / train.SUMMARY_FILE).stat().st_mtime_ns != stamp
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a finetune.py output"):
        train.finetune(config, other, data_dir, overwrite=True, show_progress=False)
    assert (other / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------------------------
# the script
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_accelerate_two_processes_complete_and_save_once(data_dir, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/ddp.yaml",
           "--num_processes", "2", "--main_process_port", str(free_port()),
           "finetune.py", "--quiet", "--model", TINY, "--task", "expression,boolean", "--n-train", "8",
           "--data", str(data_dir), "--out", str(out), "ft.max_steps=3", "ft.save_steps=2",
           "ft.per_device_batch_size=2", "ft.batch_size=8"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / train.SUMMARY_FILE).read_text())
    assert summary["world_size"] == 2 and summary["gradient_accumulation_steps"] == 2
    assert [e["step"] for e in log_lines(out)] == [1, 2, 3]  # one writer: no duplicated lines
    assert sorted(p.name for p in out.glob("adapter_model*")) == ["adapter_model.safetensors"]
    assert proc.stderr.count("INFO iclvsft.train.run: finished: 3 steps") == 1  # the main process reports once
    assert proc.stderr.count("tokens/s -> ") == 1
    assert not list(out.glob(".*.tmp"))


def test_script_help_and_clean_errors(tmp_path):
    helped, failed, nope = run_all(*([sys.executable, "finetune.py", *a] for a in (
        ["--help"], ["--task", "expression", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
        ["--task", "nope"])), cwd=ROOT, timeout=120)
    assert helped.returncode == 0
    for option in ("--config", "--model", "--task", "--n-train", "--method", "--out", "--data", "--overwrite",
                   "KEY=VALUE", "accelerate launch"):
        assert option in helped.stdout
    assert failed.returncode == 2 and failed.stderr.startswith("error:") and "generate_data.py" in failed.stderr
    assert nope.returncode == 2


def test_training_on_cuda_keeps_sdpa_off_the_cudnn_backend():
    """cuDNN attention plans a graph per packed-batch shape (a stall per new length on an H200): training
    on CUDA with SDPA runs without it and restores the process's choice after; elsewhere nothing changes."""
    from iclvsft.train.setup import training_attention

    assert torch.backends.cuda.cudnn_sdp_enabled()
    with training_attention("sdpa", "cuda:0"):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()
    for attn, device in (("sdpa", "cpu"), ("flash_attention_2", "cuda"), ("eager", "cuda")):
        with training_attention(attn, device):
            assert torch.backends.cuda.cudnn_sdp_enabled()
