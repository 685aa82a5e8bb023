"""``ft.loss_average``: the token mean (ours) and the mean of each row's token mean (the authors'), checked
against a second route (one cross-entropy per row, by hand) on the collators' batches and on the first
logged loss of a real run, where the tiny model is still at its initialisation (LoRA's B is zero)."""
from __future__ import annotations

import json

import pytest
import torch

from iclvsft import train
from iclvsft.config import load_config
from iclvsft.models import load_model
from iclvsft.train.loss import RowIndexCollator, row_means_sum

TINY = "tiny-random-qwen2"


@pytest.fixture(scope="module")
def data_dir(make_data):
    return make_data(["data.tasks=[expression,boolean]", "data.train_pattern=16", "data.train_control=0",
                      "data.test_pattern=2", "data.test_control=2"])


def _rows(data_dir, n=4):
    tok = load_model(TINY).tokenizer
    rows, _ = train.select_rows(data_dir, ["expression", "boolean"], n // 2)
    features, _ = train.tokenize_rows(rows, tok, loss_on="sequence", max_length=512, append_eos=False)
    assert len({len(f["input_ids"]) for f in features}) > 1  # rows of different lengths: the two means differ
    return features


def _by_hand(model, features) -> tuple[float, float]:
    """(mean of the rows' token means, mean over all tokens), one row at a time."""
    sums, counts = [], []
    with torch.no_grad():
        for f in features:
            ids = torch.tensor([f["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            targets = torch.tensor(f["labels"][1:])
            keep = targets != -100
            losses = torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep], reduction="none")
            sums.append(float(losses.sum()))
            counts.append(int(keep.sum()))
    return sum(s / c for s, c in zip(sums, counts)) / len(sums), sum(sums) / sum(counts)


@pytest.mark.parametrize("batching", ["padded", "padding_free"])
@pytest.mark.parametrize("logits_on", ["all", "labels"])
def test_row_means_on_every_batching_match_one_row_at_a_time(data_dir, batching, logits_on):
    loaded = load_model(TINY)
    features = _rows(data_dir)
    rows_mean, tokens_mean = _by_hand(loaded.model, features)
    collator = RowIndexCollator(train.make_collator(batching, loaded.tokenizer.pad_token_id, 512, "sdpa", logits_on))
    batch = collator(features)
    rows, labels, kept = batch.pop("row_index"), batch.pop("labels"), batch.pop(train.KEPT_TARGETS, None)
    assert int(rows.max()) + 1 == len(features)
    with torch.no_grad():
        logits = loaded.model(**batch).logits
    keep = batch["logits_to_keep"] if logits_on == "labels" else None
    got = float(row_means_sum(logits, labels, rows, keep, kept)) / len(features)
    assert got == pytest.approx(rows_mean, rel=1e-5)
    assert abs(rows_mean - tokens_mean) > 1e-3  # the test can tell the two averages apart


@pytest.mark.parametrize("average", ["rows", "tokens"])
def test_a_run_logs_the_average_it_was_asked_for(data_dir, tmp_path, average):
    """One optimizer step of 4 rows in 2 passes of 2 (gradient accumulation): the logged loss is the loss of
    the model at initialisation, averaged the asked way over all 4 rows."""
    config = load_config(None, [f"model={TINY}", "ft.tasks=[expression,boolean]", "ft.n_train=2",
                                "ft.per_device_batch_size=2", "ft.batch_size=4", "ft.max_steps=1", "ft.save_steps=0",
                                "ft.loss_on=sequence", "ft.append_eos=false", "ft.lora.dropout=0.0",
                                f"ft.loss_average={average}", "ft.train_seed=0"])
    train.finetune(config, tmp_path / "run", data_dir, show_progress=False)
    logged = json.loads((tmp_path / "run" / train.LOG_FILE).read_text().splitlines()[0])["loss"]
    rows, _ = train.select_rows(data_dir, ["expression", "boolean"], 2, seed=0)
    features, _ = train.tokenize_rows(rows, load_model(TINY).tokenizer, loss_on="sequence", max_length=512,
                                      append_eos=False)
    rows_mean, tokens_mean = _by_hand(load_model(TINY).model, features)
    assert logged == pytest.approx(rows_mean if average == "rows" else tokens_mean, rel=1e-4)
    assert abs(rows_mean - tokens_mean) > 1e-3


def test_the_default_keeps_run_identities():
    """A run recorded before the key existed (token mean) is the same run: the default is not in its identity."""
    ours = train.run_identity(load_config(None, [f"model={TINY}"]), {})
    theirs = train.run_identity(load_config(None, [f"model={TINY}", "ft.loss_average=rows"]), {})
    assert "loss_average" not in ours["ft"] and theirs["ft"]["loss_average"] == "rows"
