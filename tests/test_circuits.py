"""Circuit analysis (iclvsft/circuits/) on the tiny random Qwen2: 2 layers, 4 query heads sharing 2
key/value heads (grouped-query attention), byte-level tokenizer, fp32."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from iclvsft import engine
from iclvsft.circuits import (
    activation_patching,
    adapter_for,
    agreement,
    analyze,
    anatomy,
    attribution_patching,
    bootstrap_shift,
    capture,
    component_activation,
    corruption_candidates,
    cosine_distance,
    l1_distance,
    make_pairs,
    pair_inputs,
    patch_pair,
    run_patched,
    shift,
    tokenize_pair,
    topk_overlap,
)
from iclvsft.config import load_config
from iclvsft.data import load_items
from iclvsft.errors import ConfigError
from iclvsft.evaluate import demo_order
from iclvsft.models import load_model
from iclvsft.prompts import ft_row, prefix
from iclvsft.tasks import get_task

# Its own: relation and parity (their corruptions), and 16 pattern test items to draw pairs from.
SMALL = ["data.train_pattern=64", "data.train_control=16", "data.test_pattern=16", "data.test_control=8",
         "data.tasks=[expression,relation,parity]"]


@pytest.fixture(scope="module")
def data_dir(make_data):
    return make_data(SMALL)


@pytest.fixture(scope="module")
def expression(data_dir, tiny):
    """(task, demos, pairs) for expression: 3 demonstrations, 6 pairs."""
    task = get_task("expression")
    demos = demo_order(load_items(data_dir, "expression", "train", split="pattern"), 0, "expression", 3)
    items = load_items(data_dir, "expression", "test", split="pattern")
    pairs, _ = make_pairs(task, items, tiny.tokenizer, [[], demos], 6, "answer", 0)
    assert len(pairs) == 6
    return task, demos, pairs


def inputs_for(lm, task, pair, demos, cached=True):
    pre = engine.build_prefix(lm.model, lm.tokenizer, prefix(task, demos)) if cached else engine.empty_prefix()
    tokens = tokenize_pair(lm.tokenizer, task, pair, demos)
    assert not isinstance(tokens, str), tokens
    return pair_inputs(tokens, pre)


def expression_value(question: str) -> int:
    groups = [sum(int(t) for t in re.findall(r"[+-]?\d+", g)) for g in re.findall(r"\(([^)]*)\)", question)]
    assert len(groups) == 3, question
    return groups[0] + groups[1] * groups[2]


# --- pairs --------------------------------------------------------------------------------------

def test_pairs_are_aligned_minimal_edits(data_dir, tiny, expression):
    task, demos, pairs = expression
    for pair in pairs:
        assert pair.corrupt_answer != pair.clean_answer
        assert int(pair.corrupt_answer) == expression_value(pair.corrupt_question)
        assert pair.corrupt_question.split(")+(")[1:] == pair.clean_question.split(")+(")[1:]  # only S edited
        for d in ([], demos):
            t = tokenize_pair(tiny.tokenizer, task, pair, d)
            assert len(t.clean_ids) == len(t.corrupt_ids) and t.clean_token != t.corrupt_token
    # control: a pattern item's Z is edited, so it becomes its control twin (answer S + Z*C != S)
    items = load_items(data_dir, "expression", "test", split="pattern")
    twins, _ = make_pairs(task, items, tiny.tokenizer, [[]], 4, "control", 0)
    assert twins
    for pair in twins:
        assert pair.edit.startswith("Z[") and int(pair.corrupt_answer) == expression_value(pair.corrupt_question)
        assert pair.corrupt_question.split(")*(")[1] == pair.clean_question.split(")*(")[1]  # C kept
    # other tasks: the answer is recomputed from the edited question
    from iclvsft.tasks.relation import connected

    for name, split in (("relation", "pattern"), ("relation", "control"), ("parity", "pattern")):
        task = get_task(name)
        pairs, _ = make_pairs(task, load_items(data_dir, name, "test", split=split), tiny.tokenizer, [[]], 4,
                                "answer", 0)
        assert len(pairs) == 4 and all(p.corrupt_answer != p.clean_answer for p in pairs)
        for p in pairs:
            if name == "relation":
                lines = re.findall(r"(\w) is connected with (\w)\.", p.corrupt_question)
                assert p.corrupt_answer == ("Yes" if connected(lines, "A", "Z") else "No")
                assert all(x != y for x, y in lines)
            else:
                numbers = [int(n) for n in re.findall(r"\d+", p.corrupt_question)]
                assert p.corrupt_answer == ("odd" if sum(numbers) % 2 else "even")
    # the same seed gives the same pairs
    again, _ = make_pairs(get_task("expression"), items, tiny.tokenizer, [[], demos], 6, "answer", 0)
    assert again == expression[2]


def test_corruptions_belong_to_the_tasks(data_dir):
    """Each task lists the corruption kinds its ``corrupt`` makes (seeded order); the others refuse."""
    assert get_task("expression").corruptions == ("answer", "control")
    assert get_task("code").corruptions == ("answer",) and get_task("algebra").corruptions == ("answer",)
    item = load_items(data_dir, "expression", "test", split="pattern")[0]
    with pytest.raises(ConfigError, match="no 'control' corruption"):
        list(get_task("code").corrupt(item, "control", None))
    with pytest.raises(ConfigError, match="no 'control' corruption"):
        list(corruption_candidates(get_task("relation"), item, "control", 0))
    task = get_task("expression")
    edits = list(corruption_candidates(task, item, "answer", 0))
    assert edits == list(corruption_candidates(task, item, "answer", 0))
    assert edits != list(corruption_candidates(task, item, "answer", 1))
    assert all(int(answer) == expression_value(question) for question, answer, _ in edits)


# --- patching -----------------------------------------------------------------------------------

def test_grid_shapes_and_finiteness(tiny, expression):
    task, demos, pairs = expression
    anat = anatomy(tiny.model)
    assert anat.shape == (2, 5) and anat.n_heads == 4 and anat.head_dim == 16  # query heads, not kv heads
    assert anat.labels()[1] == ["L1.H0", "L1.H1", "L1.H2", "L1.H3", "L1.MLP"]
    for d in ([], demos):
        r = patch_pair(tiny.model, anat, inputs_for(tiny, task, pairs[0], d), "both")
        for m in (r.attribution, r.activation):
            assert m.shape == anat.shape and np.isfinite(m).all() and np.abs(m).sum() > 0
        assert np.isfinite([r.m_clean, r.m_corrupt]).all() and r.m_clean != r.m_corrupt


def test_patching_with_own_activation_changes_nothing(tiny, expression):
    task, demos, pairs = expression
    anat = anatomy(tiny.model)
    inputs = inputs_for(tiny, task, pairs[1], demos)
    for ids in (inputs.clean_ids, inputs.corrupt_ids):
        own = capture(tiny.model, anat, inputs.prefix, ids)
        reference = inputs.metric(own.logits)[0]
        comps = anat.components()
        patches = [{c: component_activation(own, c)} for c in comps]
        patches.append({c: component_activation(own, c) for c in comps})  # all at once
        with torch.no_grad():
            patched = run_patched(tiny.model, anat, inputs.prefix, [ids] * len(patches), patches=patches)
        torch.testing.assert_close(inputs.metric(patched.logits), reference.expand(len(patches)), atol=1e-5, rtol=0)
    # ... while patching in the *other* run's activation does change the metric
    exact = activation_patching(tiny.model, anat, inputs)
    assert np.abs(exact.activation).max() > 1e-3


def test_cache_and_batch_size_do_not_change_the_maps(tiny, expression):
    task, demos, pairs = expression
    anat = anatomy(tiny.model)
    cached = patch_pair(tiny.model, anat, inputs_for(tiny, task, pairs[2], demos), "both", batch_size=3)
    plain = patch_pair(tiny.model, anat, inputs_for(tiny, task, pairs[2], demos, cached=False), "both", batch_size=10)
    assert inputs_for(tiny, task, pairs[2], demos).prefix.length > 0
    np.testing.assert_allclose(cached.attribution, plain.attribution, atol=1e-5)
    np.testing.assert_allclose(cached.activation, plain.activation, atol=1e-5)
    assert cached.m_clean == pytest.approx(plain.m_clean, abs=1e-5)


def test_attribution_agrees_with_activation_patching(tiny, expression):
    """Attribution patching (first order) ranks the patching effects like exact activation patching
    (Spearman > 0.8 over all pair x component effects, and for the median pair) and gets the sign of
    the effects that matter (exact |effect| >= 10% of the largest) right: at least 90% of them here.
    Not all: on this random model the logit gaps are small and the layer-0 MLP, which acts through
    every later layer, is where the linearisation is weakest (a known limit of attribution patching)."""
    task, demos, pairs = expression
    anat = anatomy(tiny.model)
    for d in ([], demos):
        results = [patch_pair(tiny.model, anat, inputs_for(tiny, task, p, d), "both") for p in pairs]
        att = np.stack([r.attribution for r in results])
        act = np.stack([r.activation for r in results])
        assert spearmanr(att.ravel(), act.ravel()).statistic > 0.8
        assert np.median([spearmanr(a.ravel(), b.ravel()).statistic for a, b in zip(att, act)]) > 0.8
        big = np.abs(act) >= 0.1 * np.abs(act).max()
        assert big.sum() >= 10 and (np.sign(att[big]) == np.sign(act[big])).mean() >= 0.9
        agree = agreement(att, act)
        assert agree["spearman_pooled"] > 0.8 and agree["sign_agreement"] >= 0.9 and agree["n_pairs"] == len(pairs)


# --- shift metrics ------------------------------------------------------------------------------

def test_shift_metrics():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 5))
    s = shift(a, a, top_k=4)
    assert s["cosine_distance"] == pytest.approx(0, abs=1e-12) and s["l1_distance"] == pytest.approx(0, abs=1e-12)
    assert s["topk_overlap"] == 1.0
    assert np.allclose(s["per_layer"]["cosine_distance"], 0) and s["per_layer"]["l1_distance"].shape == (3,)
    assert shift(a, 3 * a, 4)["cosine_distance"] == pytest.approx(0, abs=1e-12)  # scale does not matter
    assert shift(a, 3 * a, 4)["l1_distance"] == pytest.approx(0, abs=1e-12)
    assert cosine_distance(a.ravel(), -a.ravel()) == pytest.approx(2)
    assert l1_distance(a.ravel(), -a.ravel()) == pytest.approx(1)
    assert l1_distance(np.array([1.0, 0, 0]), np.array([0, 0, 2.0])) == pytest.approx(1)  # disjoint
    assert topk_overlap(np.array([5.0, 4, 0, 0]), np.array([0, 4, 5, 0.1]), 2) == 0.5
    b = a + rng.normal(scale=0.3, size=a.shape)
    assert 0 < shift(a, b, 4)["cosine_distance"] < shift(a, rng.normal(size=a.shape), 4)["cosine_distance"]
    assert np.isnan(cosine_distance(np.zeros(3), np.ones(3)))


def test_bootstrap_shift_intervals_and_difference():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(20, 3, 5)) + rng.normal(size=(1, 3, 5)) * 3
    maps = {"base": base, "icl": rng.normal(size=(20, 3, 5)), "ft": 1.5 * base}  # FT: same map, rescaled
    s = bootstrap_shift(maps, top_k=5, n_boot=200, seed=0)
    assert s == bootstrap_shift(maps, top_k=5, n_boot=200, seed=0)  # seeded, no global RNG
    ft, icl = s["conditions"]["ft"], s["conditions"]["icl"]
    assert ft["cosine_distance"]["value"] == pytest.approx(0, abs=1e-9)
    assert ft["cosine_distance"]["ci95"][1] == pytest.approx(0, abs=1e-9) and ft["topk_overlap"]["value"] == 1
    lo, hi = icl["cosine_distance"]["ci95"]
    assert lo <= icl["cosine_distance"]["value"] <= hi and lo > 0.3
    assert len(icl["per_layer"]["l1_distance"]["value"]) == 3 and len(icl["per_layer"]["l1_distance"]["ci95"]) == 3
    diff = s["icl_minus_ft"]["cosine_distance"]
    assert diff["ci95"][0] > 0 and diff["p_icl_greater"] == 1.0
    assert 0 <= s["split_half_base"]["cosine_distance"]["median"] < lo


# --- the FT condition and the whole analysis ----------------------------------------------------

def train_tiny_lora(data_dir, out, steps=8):
    """A LoRA adapter on the tiny model: a few AdamW steps on expression FT rows, loss on the completion."""
    from peft import LoraConfig, get_peft_model

    lm = load_model("tiny-random-qwen2")
    task = get_task("expression")
    rows = [ft_row(task, i) for i in load_items(data_dir, "expression", "train", split="pattern")[:16]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        for row in rows[step % 4 * 4: step % 4 * 4 + 4]:
            p_ids = lm.tokenizer(row["prompt"])["input_ids"]
            full = lm.tokenizer(row["prompt"] + row["completion"])["input_ids"]
            labels = [-100] * len(p_ids) + full[len(p_ids):]
            loss = model(input_ids=torch.tensor([full]), labels=torch.tensor([labels])).loss / 4
            loss.backward()
        optim.step()
        optim.zero_grad()
    model.save_pretrained(out, save_embedding_layers=False)  # (no hub lookup for the tiny model's vocabulary)
    return out


def test_analysis_end_to_end_with_adapter(data_dir, tmp_path, expression):
    adapter = train_tiny_lora(data_dir, tmp_path / "adapter")
    config = load_config(None, [*SMALL, "model=tiny-random-qwen2", "circuits.tasks=[expression]", "circuits.n_items=6",
                                "circuits.shots=3", "circuits.method=attribution", "circuits.activation_items=2",
                                "circuits.bootstrap=50", "circuits.top_k=4", f"circuits.adapter={adapter}"])
    out = tmp_path / "out"
    result = analyze(config, data_dir, out, show_progress=False)
    t = result["tasks"]["expression"]
    assert set(t["conditions"]) == {"base", "icl", "ft"} and t["n_pairs"] == 6
    assert result["models"]["ft/expression"]["adapter_merged"] is True
    maps = {c: np.array(e["map"]) for c, e in t["conditions"].items()}
    assert all(m.shape == (2, 5) and np.isfinite(m).all() for m in maps.values())
    # the adapter changes the maps (a few LoRA steps), and so do the demonstrations
    assert np.abs(maps["ft"] - maps["base"]).max() > 1e-3
    assert t["shift"]["conditions"]["ft"]["cosine_distance"]["value"] > 0
    assert np.abs(maps["icl"] - maps["base"]).max() > 1e-3
    assert t["conditions"]["base"]["agreement"]["n_pairs"] == 2
    # the base condition is the plain tiny model: same map as computing it here directly
    task, demos, pairs = expression
    lm = load_model("tiny-random-qwen2")
    direct = np.mean([attribution_patching(lm.model, anatomy(lm.model), inputs_for(lm, task, p, [])).attribution
                      for p in pairs], axis=0)
    np.testing.assert_allclose(maps["base"], direct, rtol=1e-4, atol=1e-6)
    # files
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 18 and {r["condition"] for r in rows} == {"base", "icl", "ft"}
    assert sum(r["activation"] is not None for r in rows) == 6  # 2 pairs x 3 conditions
    assert json.loads((out / "circuits.json").read_text())["tasks"]["expression"]["shift"]["icl_minus_ft"]
    assert json.loads((out / "config.json").read_text())["provenance"]["versions"]["torch"]
    for name in ("base", "icl", "ft", "icl_minus_base", "ft_minus_base"):
        assert (out / "plots" / "expression" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "ICL - FT" in (out / "circuits.md").read_text()


def test_a_fully_fine_tuned_model_is_accepted_and_gives_the_merged_adapters_maps(data_dir, tmp_path):
    """circuits.adapter may name a full fine-tuned model folder: the same weights as base + merged adapter
    give the same FT map."""
    from peft import PeftModel

    adapter = train_tiny_lora(data_dir, tmp_path / "adapter", steps=2)
    base = load_model("tiny-random-qwen2")
    merged = PeftModel.from_pretrained(base.model, adapter).merge_and_unload()
    merged.save_pretrained(tmp_path / "full")
    base.tokenizer.save_pretrained(tmp_path / "full")
    common = [*SMALL, "model=tiny-random-qwen2", "circuits.tasks=[expression]", "circuits.n_items=3", "circuits.shots=2",
              "circuits.bootstrap=0"]
    maps = {}
    for name, path in (("adapter", adapter), ("full", tmp_path / "full")):
        result = analyze(load_config(None, [*common, f"circuits.adapter={path}"]), data_dir, tmp_path / f"out-{name}",
                         show_progress=False)
        maps[name] = np.array(result["tasks"]["expression"]["conditions"]["ft"]["map"])
    np.testing.assert_allclose(maps["full"], maps["adapter"], rtol=1e-4, atol=1e-6)


def test_shift_reading_uses_the_split_half_noise_reference():
    from iclvsft.circuits.report import _verdict

    diff = {"ci95": [0.05, 0.2]}  # ICL's shift minus FT's: interval above 0
    assert _verdict(diff, False) == "ICL shifts more (supports the claim)"
    assert _verdict(diff, False, {"icl": {"value": 0.3}, "ft": {"value": 0.15}}, reference=0.2).startswith("ICL shifts")
    # ICL's shift (0.18) is no larger than two halves of the base items are apart (0.2): inside the noise
    assert _verdict(diff, False, {"icl": {"value": 0.18}, "ft": {"value": 0.05}}, reference=0.2).startswith(
        "no clear difference (the larger shift is within")
    # top-k overlap is a similarity: FT moved further when ICL - FT > 0; FT's overlap 0.5 < the halves' 0.7
    assert _verdict({"ci95": [0.1, 0.3]}, True, {"icl": {"value": 0.8}, "ft": {"value": 0.5}}, 0.7).startswith("FT")
    assert _verdict({"ci95": [0.1, 0.3]}, True, {"icl": {"value": 0.9}, "ft": {"value": 0.75}}, 0.7).startswith("no")


def test_config_and_cli_errors(data_dir, root):
    with pytest.raises(ConfigError, match="'control' is not defined for 'code'"):
        load_config(None, ["circuits.tasks=[code]", "circuits.corruption=control"])
    with pytest.raises(ConfigError, match="control"):
        load_config(None, ["circuits.tasks=[relation]", "circuits.corruption=control"])
    with pytest.raises(ConfigError, match="circuits.method"):
        load_config(None, ["circuits.method=exact"])
    with pytest.raises(ConfigError, match="n_items"):
        load_config(None, ["circuits.n_items=0"])
    cfg = load_config(None, ["circuits.adapter=/nonexistent/{task}"])
    with pytest.raises(ConfigError, match="neither a LoRA adapter"):
        adapter_for(cfg, "expression")
    help_text = subprocess.run([sys.executable, str(root / "analyze_circuits.py"), "--help"], capture_output=True,
                               text=True, cwd=root, timeout=60).stdout
    for option in ("--adapter", "--shots", "--n-items", "--method", "--corruption", "--bootstrap", "--top-k", "--out"):
        assert option in help_text
    bad = subprocess.run([sys.executable, str(root / "analyze_circuits.py"), "--data", str(data_dir),
                          "circuits.tasks=[algebra]", "circuits.corruption=control"], capture_output=True, text=True,
                         cwd=root, timeout=60)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr


def test_code_and_algebra_corruptions_recompute_the_answer_by_a_second_route(make_data):
    """code: the edited program, run in the sandbox, prints the new answer; algebra: the new answer
    solves all three edited equations. Both keep the item's shape (only the input / a changes)."""
    from iclvsft.sandbox import run_programs

    data_dir = make_data(["data.tasks=[code,algebra]", "data.train_pattern=8", "data.train_control=8",
                          "data.test_pattern=6", "data.test_control=6"])
    code = get_task("code")
    items = load_items(data_dir, "code", "test")[:6]
    edits = [next(corruption_candidates(code, item, "answer", 0)) for item in items]
    results = run_programs([question for question, _, _ in edits])
    assert [r.stdout for r in results] == [f"{answer}\n" for _, answer, _ in edits]
    assert all(q != item.question and q.count("\n") == item.question.count("\n") for (q, _, _), item in zip(edits, items))

    algebra = get_task("algebra")
    for item in load_items(data_dir, "algebra", "test")[:6]:
        for question, answer, _ in corruption_candidates(algebra, item, "answer", 0):
            a, b = (int(x.split("=")[1]) for x in answer.split(","))
            for eq in question.removesuffix(". Solve for a and b:").split(", "):
                lhs, rhs = eq.split(" = ")
                p, q = (int(t.strip()[:-1] or 1) for t in lhs.split(" + "))
                assert p * a + q * b == int(rhs), (question, answer)
            assert answer != item.answer and answer.startswith(algebra.answer_prefix)


def test_heatmap_colour_bar_label_fits_in_the_figure():
    """The colour bar's label (written along the bar) and the title lie inside the figure, for a model of
    2 layers as for one of 30 (it used to run off the top of short figures)."""
    import matplotlib.pyplot as plt

    from iclvsft.circuits.plots import heatmap_figure

    for n_layers, n_heads in ((2, 4), (24, 14), (30, 9)):
        for label in ("effect on logit diff", "share of |effect|, difference"):
            fig = heatmap_figure(np.ones((n_layers, n_heads + 1)), "expression: icl - base (each map / its L1 norm)",
                                 n_heads, label)
            fig.canvas.draw()
            renderer = fig.canvas.get_renderer()
            bar_label = fig.axes[1].yaxis.label
            assert bar_label.get_text() == label
            for text in (bar_label, fig.axes[0].title):
                box = text.get_window_extent(renderer)
                assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and \
                    box.y1 <= fig.bbox.y1, (n_layers, label, box, fig.bbox)
            plt.close(fig)

