"""Model and dataset cards (iclvsft/cards.py) as the Hugging Face Hub reads them.

What must hold: huggingface_hub's own parser (``ModelCard.load``/``DatasetCard.load``) reads both
cards; ``base_model`` is the upstream Hub id of an offline model (never the local alias or a path),
the local name and folder stay in the card's ``iclvsft`` metadata; no placeholder link; the paper is
cited; the dataset card names the tool and version that made the data; losses are rounded. A LoRA
adapter records the upstream id as its base and still loads here, onto the offline copy it was
trained on.
"""
from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import DatasetCard, ModelCard
from huggingface_hub.utils import validate_repo_id

from iclvsft import __version__
from iclvsft.cards import PAPER_ARXIV, model_card
from iclvsft.config import load_config
from iclvsft.models import OFFLINE_MODELS

SMOL = "smollm2-135m-instruct"


def fake_summary(model_info: dict) -> dict:
    return {"model_info": model_info, "final_loss": 0.123456789, "steps": 4, "precision": {"dtype": "float32"},
            "data": {"tasks": {"expression": {"train_sha256": "ab" * 32}}}}


def test_every_offline_model_names_a_hub_id():
    for model in OFFLINE_MODELS.values():
        validate_repo_id(model.upstream)
        repo = model.upstream.split("/")[1].lower()
        # the offline name is the repository's name (gemma3-270m: google/gemma-3-270m, hyphens aside)
        assert model.upstream.count("/") == 1 and repo.replace("-", "") == model.name.replace("-", "")


def test_model_card_passes_the_hub_parser_and_names_the_upstream_id(tmp_path):
    config = load_config(None, [f"model={SMOL}", "ft.tasks=[expression]", "ft.n_train=8"])
    info = {"name": SMOL, "source": "offline", "path": f"/cache/models/{SMOL}", "gguf_file": "x.gguf", "sha256": "cd"}
    model_card(config, fake_summary(info), {"expression": {"pattern": 50.0, "control": 25.0}}).save(tmp_path / "README.md")

    card = ModelCard.load(tmp_path / "README.md")  # the Hub library's own parsing (YAML front matter -> ModelCardData)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert f"arxiv:{PAPER_ARXIV}" in card.data.tags
    ours = card.data.to_dict()["iclvsft"]
    assert ours["base_model_local"] == SMOL and ours["base_model_path"] == f"/cache/models/{SMOL}"
    assert ours["version"] == __version__ and ours["gguf_sha256"] == "cd"
    assert "https://github.com/)" not in card.text and "(README of the repository)" not in card.text
    assert "final loss 0.1235," in card.text and "0.123456789" not in card.text
    assert f"arXiv {PAPER_ARXIV}" in card.text and "@inproceedings{yin-etal-2024-deeper" in card.text
    assert "| expression | 50.0 | 25.0 |" in card.text

    hub = load_config(None, ["model=Qwen/Qwen2.5-Coder-0.5B-Instruct", "ft.tasks=[expression]", "ft.method=full"])
    card = ModelCard(str(model_card(hub, fake_summary({"source": "hub", "path": "Qwen/Qwen2.5-Coder-0.5B-Instruct"}))))
    assert card.data.base_model == "Qwen/Qwen2.5-Coder-0.5B-Instruct" and card.data.library_name == "transformers"


def test_dataset_card_passes_the_hub_parser(tmp_path):
    from iclvsft.data import generate

    config = load_config(None, ["data.tasks=[expression,parity]", "data.train_pattern=4", "data.train_control=2",
                                "data.test_pattern=2", "data.test_control=2"])
    generate(config, tmp_path, show_progress=False)
    card = DatasetCard.load(tmp_path / "README.md")
    assert card.data.license == "mit" and card.data.pretty_name == "iclvsft implicit-pattern tasks"
    configs = {c["config_name"]: c["data_files"] for c in card.data.configs}
    assert list(configs) == ["all", "expression", "parity"]
    assert configs["parity"] == [{"split": "train", "path": "parity/train.jsonl"},
                                 {"split": "test", "path": "parity/test.jsonl"}]
    assert card.data.to_dict()["iclvsft"]["version"] == __version__
    assert f"Made by iclvsft {__version__} (`iclvsft generate`, the same as `python generate_data.py`)" in card.text
    assert "git None" not in card.text and "(README of the repository)" not in card.text
    assert "@inproceedings{yin-etal-2024-deeper" in card.text


@pytest.mark.slow
def test_adapter_names_the_upstream_id_and_loads_onto_the_offline_copy(tmp_path):
    """The saved adapter's base_model_name_or_path is the Hub id (portable); load_model(folder) here
    maps it to the offline copy and reproduces the adapted logits."""
    from peft import LoraConfig, get_peft_model

    from iclvsft.models import load_model
    from iclvsft.models.loading import quiet_peft_deprecation
    from iclvsft.train.run import point_adapter_at_base

    base = load_model(SMOL, dtype="fp32")
    with quiet_peft_deprecation():
        peft_model = get_peft_model(base.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    peft_model.save_pretrained(tmp_path, save_embedding_layers=False)
    point_adapter_at_base(tmp_path, base.info)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    ids = torch.tensor([base.tokenizer("(1+6)+(-3+3)*(-1-3+9-5)=")["input_ids"]])
    with torch.no_grad():
        expected = peft_model.eval()(ids).logits
        loaded = load_model(str(tmp_path), dtype="fp32")
        assert loaded.info["source"] == "offline" and loaded.info["adapter"] == str(tmp_path.resolve())
        assert torch.allclose(loaded.model(ids).logits, expected, atol=1e-5)
