"""The plan step (iclvsft/plan/, reproduce.py --plan) and the GPU path's choices, without a GPU.

What must hold (the issue "its GPU path has never run"):
* the memory estimate matches what training really holds: exactly for weights, gradients and
  optimizer state, within 25% for the saved activations, measured by tensor accounting after a real
  training step on CPU (a Qwen2-shaped model of another shape than the constants were fit on); and
  the peaks measured on an H200 (benchmarks/README.md, "On a GPU") within 25%; 7B full FT does not
  fit one 80 GB GPU and fits with ZeRO-3 + CPU offload;
* on a faked CUDA machine with flash-attn present, every protocol of configs/paper.yaml resolves to
  FlashAttention-2 with the load dtype and autocast decided here (full FT: fp32 master weights, bf16
  autocast, FlashAttention-2 switched on after loading), and transformers hands the kernel bf16 q/k/v
  under bf16 autocast over fp32 weights;
* `reproduce.py --plan --config configs/paper.yaml` prints a plan in which every run fits the stated
  machines (1 x 80 GiB GPU + 200 GiB host; 8 x 80 GiB GPUs), and check_plan refuses, in one line, a
  run that cannot run here;
* every shipped accelerate config is checked against the config's batch sizes.
"""
from __future__ import annotations

import dataclasses
import shlex
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from iclvsft import plan
from iclvsft.config import derive, load_config, protocol_ft
from iclvsft.errors import ConfigError
from iclvsft.jobs import plan_ft
from iclvsft.models import precision as precision_module
from iclvsft.plan import CPU_OVERHEAD, GIB, KNOWN_SHAPES, Machine, check_accelerate_config, check_plan, model_shape, train_memory
from iclvsft.train import setup

PAPER = ROOT / "configs" / "paper.yaml"
ACCELERATE = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
TOLERANCE = 0.25  # relative, for activations and measured peaks


def paper() -> dict:
    return load_config(str(PAPER))


def one_run_per_protocol(config: dict) -> dict:
    runs = {}
    for run in plan_ft(config):
        runs.setdefault(run.protocol, run)
    return runs


# ----------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------

def test_known_shapes_match_the_measured_parameter_counts():
    # bench_memory.py's table (benchmarks/README.md): parameters and LoRA r16 trainable parameters
    for size, params, lora in [("qwen2.5-0.5b", 494e6, 8.8e6), ("qwen2.5-1.5b", 1.54e9, 18.5e6),
                               ("qwen2.5-7b", 7.62e9, 40.4e6)]:
        shape = KNOWN_SHAPES[size]
        assert shape.params == pytest.approx(params, rel=0.005), size
        assert shape.lora_params(16) == pytest.approx(lora, rel=0.01), size
    assert plan.model_shape("Qwen/Qwen2.5-7B-Instruct") == KNOWN_SHAPES["qwen2.5-7b"]
    assert plan.model_shape("someone/unknown-model") is None


def test_gemma3_shapes():
    """Gemma 3: head_dim wider than hidden / heads, tied embeddings, and a multimodal release's partial
    text_config (the rest transformers' defaults)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from iclvsft.models import count_parameters

    gemma = KNOWN_SHAPES["gemma3-270m"]
    assert gemma.params == pytest.approx(268_098_176, rel=1e-3)  # the offline model's count
    assert plan.model_shape("google/gemma-3-270m").params == gemma.params
    cfg = Gemma3TextConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=32, vocab_size=512)
    shape = plan.shape_from_config(cfg.to_dict())
    assert (shape.hd, shape.tied, shape.qkv_bias) == (32, True, False)
    assert shape.params == pytest.approx(count_parameters(Gemma3ForCausalLM(cfg)), rel=0.02)
    nested = {"model_type": "gemma3", "text_config": {"model_type": "gemma3_text", "hidden_size": 2560,
                                                      "intermediate_size": 10240, "num_hidden_layers": 34}}
    assert plan.shape_from_config(nested).params == pytest.approx(3.88e9, rel=0.01)  # gemma-3-4b's decoder


def test_shape_of_the_tiny_model_counts_its_parameters():
    from iclvsft.models import build_tiny_model, count_parameters

    assert plan.model_shape("tiny-random-qwen2").params == count_parameters(build_tiny_model())


# ----------------------------------------------------------------------------------------------
# memory: tensor accounting of a real training step (CPU) and the H200 peaks
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mini_folder(tmp_path_factory):
    """A Qwen2 model of a shape the activation constants were not fit on (hidden 512, 8/2 heads,
    intermediate 1408, 3 layers, untied vocabulary 2048), saved with the tiny tokenizer."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from iclvsft.models import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("mini-qwen2")
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=512, intermediate_size=1408, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=False, max_position_embeddings=1024,
                      use_sliding_window=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def measure_step(folder: Path, method: str, dtype: str, rows: int = 2, tokens: int = 64) -> dict:
    """One optimizer step through the project's own model set-up (plan_precision, build_model), under
    the Trainer's autocast, with fused AdamW: the bytes of weights, gradients, optimizer state, and of
    the non-parameter tensors autograd saved in the forward pass."""
    config = load_config(None, [f"model={folder}", f"dtype={dtype}", f"ft.method={method}", "ft.lora.dropout=0.05"])
    precision = setup.plan_precision(config, torch.device("cpu"))
    model, _, _ = setup.build_model(config, precision, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    x = torch.randint(0, 2048, (rows, tokens), generator=torch.Generator().manual_seed(0))
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            s = t.untyped_storage()
            if s.data_ptr() not in param_ptrs:
                saved[s.data_ptr()] = max(saved.get(s.data_ptr(), 0), s.nbytes())
        return t

    half = precision.bf16
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            loss = model(input_ids=x, labels=x).loss
    loss.backward()
    grads = _storage_bytes(p.grad for p in params)
    optimizer.step()
    state = _storage_bytes(t for st in optimizer.state.values() for t in st.values()
                           if isinstance(t, torch.Tensor) and t.numel() > 1)
    return {"weights": _storage_bytes(model.parameters()), "gradients": grads, "optimizer": state,
            "saved": sum(saved.values()), "tokens": rows * tokens, "half": half}


def measured_and_estimated(folder, method: str, dtype: str) -> tuple[dict, dict, float]:
    """One real training step's tensors, the formula's parts for the same shape, and the formula's
    estimate of what the forward pass keeps for the backward pass: the autocast copies of the weights,
    the activations, and the fp32 log-softmax of the loss (4 of LOGIT_BYTES' 12 bytes; the rest is
    transient at the start of the backward pass)."""
    measured = measure_step(folder, method, dtype)
    est = train_memory(plan.model_shape(str(folder)), method, tokens=measured["tokens"],
                       logit_positions=measured["tokens"], half=dtype != "fp32", optimizer="adamw_torch_fused",
                       cuda=False).parts
    return measured, est, est["autocast_copies"] + est["activations"] + est["logits"] * 4 / plan.LOGIT_BYTES


@pytest.mark.parametrize("method", ["full", "lora"])
def test_estimate_matches_the_tensors_of_a_training_step(mini_folder, method):
    measured, est, saved_estimate = measured_and_estimated(mini_folder, method, "bf16")
    # exact parts: the formula's bytes per parameter
    for part in ("weights", "gradients", "optimizer"):
        assert est[part] == pytest.approx(measured[part], rel=0.01), part
    assert saved_estimate == pytest.approx(measured["saved"], rel=TOLERANCE), (saved_estimate, measured["saved"])


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fp32_estimate_is_an_upper_bound(mini_folder, method):
    measured, _, saved_estimate = measured_and_estimated(mini_folder, method, "fp32")
    assert measured["saved"] <= saved_estimate <= 2.5 * measured["saved"]


# bench_memory.py on an H200 (benchmarks/README.md): Qwen2.5 shapes, 4 rows x 128 tokens, loss on every
# position, bf16 (LoRA: bf16 base; full: fp32 weights under autocast), torch AdamW (foreach), no checkpointing
H200_PEAK_GIB = {("qwen2.5-0.5b", "lora"): 3.0, ("qwen2.5-0.5b", "full"): 9.3, ("qwen2.5-1.5b", "lora"): 6.2,
                 ("qwen2.5-1.5b", "full"): 28.9, ("qwen2.5-7b", "lora"): 20.5}


def h200_estimate(size: str, method: str) -> float:
    return train_memory(KNOWN_SHAPES[size], method, tokens=512, logit_positions=512, half=True,
                        optimizer="adamw_torch", cuda=True).device


@pytest.mark.parametrize(("size", "method"), sorted(H200_PEAK_GIB))
def test_estimate_reproduces_the_h200_peaks(size, method):
    assert h200_estimate(size, method) / GIB == pytest.approx(H200_PEAK_GIB[(size, method)], rel=TOLERANCE)


def test_7b_full_ft_needs_sharding_or_offload():
    # the H200 run went out of memory on its 141 GB card: the estimate must say so too
    assert h200_estimate("qwen2.5-7b", "full") > 141e9
    config = paper()
    authors = one_run_per_protocol(config)["authors"]
    ft, shape = authors.config.ft, KNOWN_SHAPES["qwen2.5-7b"]
    fts = plan.ft_shape(ft, config)
    kwargs = dict(tokens=fts.tokens_per_pass, logit_positions=fts.logit_positions, optimizer=ft.optimizer,
                  accumulation=plan.accumulation_for(ft, 1))
    one_gpu = Machine(1, 80 * GIB, 200 * GIB, "")
    single = train_memory(shape, "full", **kwargs)
    assert single.device > 80 * GIB and not plan.fits(single, one_gpu)
    offload = train_memory(shape, "full", strategy="zero3_offload", n_gpus=1, **kwargs)
    assert offload.device < 40 * GIB and 100 * GIB < offload.host < 130 * GIB and plan.fits(offload, one_gpu)
    assert not plan.fits(offload, Machine(1, 80 * GIB, 64 * GIB, ""))  # the host must hold the optimizer
    zero3 = train_memory(shape, "full", strategy="zero3", n_gpus=4, **{**kwargs, "accumulation": 1})
    assert plan.fits(zero3, Machine(4, 80 * GIB, 200 * GIB, ""))
    # the fused optimizer (the study's) has no foreach temporaries; gradient checkpointing shrinks activations
    assert train_memory(shape, "full", **{**kwargs, "optimizer": "adamw_torch"}).device > single.device
    assert train_memory(shape, "full", checkpointing=True, **kwargs).parts["activations"] < \
        single.parts["activations"]


def test_low_precision_full_ft_estimate_by_hand():
    """Full FT of Qwen2.5-1.5B (1,543,714,304 parameters, tied 151,936 x 1,536 embedding, the largest
    tensor: 233,373,696 values), 4 rows x 36 tokens per pass, 4 answer positions per row, accumulation 4,
    on the CPU, worked out by hand: torchao's 8-bit AdamW keeps 2 x (1 + 4/256) = 2.03125 bytes per
    parameter (4-bit: 1.03125) and steps through 8 bytes per value of the largest tensor (4-bit: 24, as
    measured); ft.param_dtype=bf16 halves weights and gradients and needs no autocast copies."""
    p, largest = 1_543_714_304, 151_936 * 1_536
    shape = KNOWN_SHAPES["qwen2.5-1.5b"]
    assert (shape.params, shape.largest_tensor) == (p, largest)
    kwargs = dict(tokens=4 * 36, logit_positions=4 * 4, accumulation=4, cuda=False)
    base = train_memory(shape, "full", optimizer="adamw_torch_fused", **kwargs).parts
    acts_logits = base["activations"] + base["logits"]
    for optimizer, param_bytes, state, temp in [("adamw_torch_fused", 4, 8 * p, 0),
                                                ("adamw_torch_8bit", 4, 3_135_669_680, 1_866_989_568),
                                                ("adamw_torch_8bit", 2, 3_135_669_680, 1_866_989_568),
                                                ("adamw_torch_4bit", 2, 1_591_955_376, 5_600_968_704)]:
        est = train_memory(shape, "full", optimizer=optimizer, param_bytes=param_bytes, **kwargs)
        weights, grads = param_bytes * p, param_bytes * p
        copies = 2 * p if param_bytes == 4 else 0  # bf16 autocast copies of every (tied) matmul weight
        assert est.parts["weights"] == weights and est.parts["gradients"] == grads, optimizer
        assert est.parts["optimizer"] == pytest.approx(state, abs=1) and est.parts["optimizer_temp"] == temp
        assert est.parts["autocast_copies"] == copies
        # accumulation > 1: the gradients are held through the forward passes of a step
        forward, step = copies + acts_logits + grads, grads + temp
        assert est.device == pytest.approx(weights + state + max(forward, step), abs=1), optimizer
    # in GiB: 26.4 (the default), 17.8 (8-bit moments), 10.4 (and bf16 weights): only the last two fit
    # this 23 GiB machine (with the process's 2 GiB, at 90%)
    machine = Machine(0, 0.0, 23 * GIB, "")
    assert [round(train_memory(shape, "full", optimizer=o, param_bytes=b, **kwargs).device / GIB, 1) for o, b in
            [("adamw_torch_fused", 4), ("adamw_torch_8bit", 4), ("adamw_torch_8bit", 2)]] == [26.4, 17.8, 10.4]
    assert [plan.fits(train_memory(shape, "full", optimizer=o, param_bytes=b, **kwargs), machine) for o, b in
            [("adamw_torch_fused", 4), ("adamw_torch_8bit", 4), ("adamw_torch_8bit", 2)]] == [False, True, True]


# bench_lowmem.py on the project's 2-core CPU (benchmarks/README.md, "Full fine-tuning in low precision"):
# full FT of the offline models, 16 expression rows in one pass (516 tokens, 52 of them labelled), bf16
# compute; the peak resident memory of the process while it trained, in GiB. Keys: model, optimizer, bytes
# per weight (4: fp32 master weights, 2: ft.param_dtype=bf16); values: (parameters the loaded model had,
# measured peak).
CPU_PEAK_GIB = {("qwen2.5-coder-0.5b-instruct", "adamw_torch_fused", 4): (630_167_424, 11.57),
                ("qwen2.5-coder-0.5b-instruct", "adamw_torch_8bit", 4): (630_167_424, 9.38),
                ("qwen2.5-coder-0.5b-instruct", "adamw_torch_8bit", 2): (630_167_424, 6.47),
                ("qwen2.5-coder-0.5b-instruct", "adamw_torch_4bit", 2): (630_167_424, 8.00),
                ("qwen2.5-coder-1.5b-instruct", "adamw_torch_8bit", 2): (1_777_088_000, 14.24)}


@pytest.mark.parametrize("key", sorted(CPU_PEAK_GIB))
def test_estimate_matches_the_measured_cpu_peaks(key):
    """The plan's figure (estimate + the CPU process overhead) against the peak measured on this machine:
    the known shape is the loaded model's (no cache needed), and the figure is within 6% of the peak
    (the fit rule keeps 10% of the memory free, so an estimate may fall short by less than that)."""
    model, optimizer, param_bytes = key
    params, measured = CPU_PEAK_GIB[key]
    shape = model_shape(model)
    assert shape is not None and shape.params == params == KNOWN_SHAPES[model].params
    est = train_memory(shape, "full", tokens=516, logit_positions=52, half=True, optimizer=optimizer,
                       accumulation=1, cuda=False, param_bytes=param_bytes)
    assert (est.device + CPU_OVERHEAD) / GIB == pytest.approx(measured, rel=0.06)


@pytest.fixture
def bf16_cpu(monkeypatch):
    """The project's 2-core CPU machine whose figures these tests hold has native bf16 (AVX512-BF16), where
    `dtype: auto` is bf16. On a CPU without it (an AVX2-only EPYC, 2026-12-05) auto is fp32 and the plan
    rightly gives other memory and time figures, so the tests say which machine they describe."""
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)


def test_plan_of_1_5b_full_ft_on_this_machine(tmp_path, bf16_cpu):
    """The size sweep with a full-FT protocol on Qwen2.5-1.5B (its tied upstream shape: a hub id, not the
    offline copy, whose converted config may differ): refused on a 23 GiB CPU machine with the default
    optimizer, naming the 8-bit optimizer as what would fit; planned with it (and with bf16 weights)."""
    config = load_config(str(ROOT / "configs" / "cpu_scale.yaml"),
                         ["reproduce.models=[Qwen/Qwen2.5-1.5B-Instruct]", "reproduce.ft_protocols={full: {method: full}}",
                          "reproduce.compare_protocol=full", "ft.per_device_batch_size=4"])
    machine = Machine(0, 0.0, 23 * GIB, "the project's 2-core CPU machine")
    with pytest.raises(ConfigError, match=r"full \(full\) N=16: .* needs ~29 GiB on one device, host RAM has 23 GiB; "
                                          r"would fit: LoRA here \(~6 GiB\); or ft.optimizer=adamw_torch_8bit here "
                                          r"\(~20 GiB\); or one GPU"):
        check_plan(config, machine, tmp_path)
    for low_ft in ({"optimizer": "adamw_torch_8bit"}, {"optimizer": "adamw_torch_8bit", "param_dtype": "bf16"}):
        low = derive(config, {"reproduce.ft_protocols": {"full": {"method": "full", **low_ft}}})
        rows = [r for r in check_plan(low, machine, tmp_path).rows if r.stage == "FT"]
        assert rows and all(r.fits for r in rows)


# ----------------------------------------------------------------------------------------------
# the GPU path on a faked CUDA machine with flash-attn present
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def fake_cuda(monkeypatch):
    """torch sees one 80 GiB CUDA device with bf16, and flash_attn imports (a stub module)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, **k: (79 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake H100 80GB")
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert precision_module.flash_attn_available()
    return torch.device("cuda")


def test_resolve_attn_decides_from_the_compute_dtype(fake_cuda):
    resolve = precision_module.resolve_attn_implementation
    assert resolve("auto", "cuda", torch.bfloat16) == "flash_attention_2"
    assert resolve("auto", "cuda", torch.float32) is None  # fp32 without autocast: SDPA
    assert resolve("auto", "cuda", torch.float32, autocast_dtype=torch.bfloat16) == "flash_attention_2"
    assert resolve("flash_attention_2", "cuda", torch.float32, autocast_dtype=torch.bfloat16) == "flash_attention_2"
    with pytest.raises(ConfigError, match="bf16 or fp16"):
        resolve("flash_attention_2", "cuda", torch.float32)
    assert resolve("auto", "cpu", torch.float32, autocast_dtype=torch.bfloat16) is None


def test_every_paper_protocol_resolves_on_a_cuda_machine_with_flash_attn(fake_cuda):
    config = paper()
    runs = one_run_per_protocol(config)
    assert set(runs) == set(config.reproduce.ft_protocols)
    expected = {  # method -> (load dtype, cast, autocast, attention, passed to load_model, switched after)
        "lora": ("bfloat16", "bfloat16", "bfloat16", "flash_attention_2", "flash_attention_2", False),
        "full": ("float32", "float32", "bfloat16", "flash_attention_2", "auto", True),
    }
    for name, run in runs.items():
        cfg = run.config
        precision = setup.plan_precision(cfg, fake_cuda)
        got = setup.plan_model(cfg, precision, fake_cuda)
        want = expected[cfg.ft.method]
        assert (got.load_dtype, got.cast_to, got.autocast, got.attn, got.attn_at_load, got.switch_attn) == want, name
        assert precision.bf16 and not precision.fp16  # the Trainer's autocast
        if cfg.ft.method == "full":
            assert "autocast" in got.note and "fp32 master weights" in got.note
        # DeepSpeed ZeRO-3 (loaded on CPU, partitioned): its engine keeps bf16 weights and the fp32 master
        # copy in the optimizer, so the weights load in bf16, are not cast, and get FlashAttention-2 after loading
        ds = setup.plan_model(cfg, precision, fake_cuda, sharded=True, deepspeed_zero3=True)
        assert (ds.load_dtype, ds.cast_to, ds.attn, ds.attn_at_load, ds.switch_attn) == \
            ("bfloat16", None, "flash_attention_2", "auto", True), name
        # FSDP: loaded on CPU in the planned dtype, FlashAttention-2 switched on after loading
        fsdp = setup.plan_model(cfg, precision, fake_cuda, sharded=True)
        assert (fsdp.load_dtype, fsdp.attn, fsdp.switch_attn) == (want[0], "flash_attention_2", True), name
    # without flash-attn: SDPA everywhere, nothing to switch
    sys.modules.pop("flash_attn")
    for run in runs.values():
        got = setup.plan_model(run.config, setup.plan_precision(run.config, fake_cuda), fake_cuda)
        assert (got.attn, got.attn_at_load, got.switch_attn) == (None, "auto", False)


def test_build_model_full_ft_on_fake_cuda_loads_fp32_then_switches_to_flash(fake_cuda, monkeypatch):
    """build_model with the paper's full-FT protocol on a faked CUDA machine: load_model is asked for
    fp32 weights on the GPU with the default kernel (it would refuse flash_attention_2 for fp32), then
    the model switches to FlashAttention-2; its weights stay fp32 and trainable."""
    from iclvsft.models import load_model

    calls = []

    def fake_load(name, **kwargs):
        calls.append(kwargs)
        kwargs = {**kwargs, "device": "cpu", "attn_implementation": "sdpa"}  # the tiny model, on the CPU
        loaded = load_model("tiny-random-qwen2", **kwargs)
        model = loaded.model

        def switch(impl):
            calls.append({"switched_to": impl})
            model.config._attn_implementation = impl

        model.set_attn_implementation = switch
        return loaded

    monkeypatch.setattr(setup, "load_model", fake_load)
    cfg = derive(one_run_per_protocol(paper())["authors"].config, {"model": "tiny-random-qwen2"})
    precision = setup.plan_precision(derive(cfg, {"dtype": "bf16"}), fake_cuda)
    model, _, info = setup.build_model(cfg, precision, fake_cuda)
    assert calls[0] == {"dtype": "float32", "device": "cuda", "attn_implementation": "auto", "show_progress": True}
    assert calls[1] == {"switched_to": "flash_attention_2"}
    assert info["attn_implementation"] == "flash_attention_2" and info["load_dtype"] == "float32"
    assert info["autocast"] == "bfloat16"
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())


def test_flash_attention_gets_half_precision_inputs_under_autocast_over_fp32_weights():
    """What transformers' flash_attention_forward does before calling the kernel, run on CPU: with
    fp32 weights under bf16 autocast, q and k come out of RoPE in fp32 and v in bf16; transformers
    casts all three to the autocast dtype (get_target_dtype + fa_peft_integration_check), so the
    FlashAttention-2 kernel gets bf16. Training then runs forward and backward."""
    from transformers import AttentionInterface
    from transformers.integrations.flash_attention import get_target_dtype
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_flash_attention_utils import fa_peft_integration_check

    from iclvsft.models import build_tiny_model

    seen = []

    def kernel_inputs(module, query, key, value, attention_mask, **kwargs):
        q, k, v = fa_peft_integration_check(query, key, value, get_target_dtype(query, module))
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa_attention_forward(module, q, k, v, attention_mask, **kwargs)

    AttentionInterface.register("iclvsft_test_kernel_inputs", kernel_inputs)
    model = build_tiny_model(None)
    model.set_attn_implementation("iclvsft_test_kernel_inputs")
    model.train()
    x = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen)
    assert all(p.dtype == torch.float32 and p.grad is not None for p in model.parameters())


def test_detect_machine_reads_cuda_memory(fake_cuda):
    m = plan.detect_machine()
    assert (m.gpus, m.gpu_bytes) == (1, 79 * GIB) and "Fake H100" in m.label
    stated = plan.detect_machine(8, 80, 1000)
    assert (stated.gpus, stated.gpu_bytes, stated.host_bytes) == (8, 80 * GIB, 1000 * GIB)


def test_detect_machine_without_cuda():
    m = plan.detect_machine()
    assert m.gpus == 0 and m.host_bytes == plan.host_ram_bytes() > 0
    with pytest.raises(ConfigError, match="--plan-gpu-gib"):
        plan.detect_machine(gpus=2)


# ----------------------------------------------------------------------------------------------
# the plan of configs/paper.yaml, reproduce.py --plan, check_plan
# ----------------------------------------------------------------------------------------------

def run_plan(capsys, *args) -> str:
    from iclvsft.commands import reproduce_main

    assert reproduce_main(["--plan", "--config", str(PAPER), *args]) == 0
    return capsys.readouterr().out


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| #")]


@pytest.mark.parametrize(("args", "how_7b_full"), [
    (["--plan-gpus", "1", "--plan-gpu-gib", "80", "--plan-host-gib", "200"], "ZeRO-3 + CPU offload x1"),
    (["--plan-gpus", "8", "--plan-gpu-gib", "80", "--plan-host-gib", "1000"], "ZeRO-3 x4"),
])
def test_paper_plan_fits_the_stated_machines(capsys, args, how_7b_full):
    text = run_plan(capsys, *args)
    rows = table_rows(text)
    config = paper()
    assert sum(int(r[4].split()[0]) for r in rows if r[1] == "ICL") == 3 * 6 * (1 + 6 * 3)  # every cell
    assert sum(int(r[4].split()[0]) for r in rows if r[1] == "FT") == len(plan_ft(config)) == 279  # every run
    assert all(r[9] == "yes" for r in rows) and "Every run fits this machine." in text
    full_7b = [r for r in rows if r[2] == "Qwen2.5-7B-Instruct" and "(full)" in r[3]]
    assert len(full_7b) == 1 and full_7b[0][5] == how_7b_full
    assert float(full_7b[0][6]) < 72  # per GPU, within 90% of 80 GiB
    yaml_file = "deepspeed_zero3_offload.yaml" if "offload" in how_7b_full else "deepspeed_zero3.yaml"
    assert f"configs/accelerate/{yaml_file}" in text
    # everything else runs in reproduce.py's one process on one GPU
    assert all(r[5] == "1 GPU" for r in rows if r is not full_7b[0])


def test_plan_launch_command_trains_the_folder_reproduce_reads(capsys):
    """The printed command passes the accelerate check and gives finetune.py exactly the run's config
    (so reproduce.py reuses the folder it writes)."""
    text = run_plan(capsys, "--plan-gpus", "8", "--plan-gpu-gib", "80", "--plan-host-gib", "1000")
    command = next(line for line in text.splitlines() if line.startswith("* row")).split("`")[1]
    argv = shlex.split(command)
    config_file = argv[argv.index("--config_file") + 1]
    processes = int(argv[argv.index("--num_processes") + 1])
    script = argv.index("finetune.py")
    args = argv[script + 1:]
    overrides = [a for a in args if "=" in a and not a.startswith("--")]
    model = args[args.index("--model") + 1]
    out = args[args.index("--out") + 1]
    run = next(r for r in plan_ft(paper()) if r.protocol == "authors" and "7B" in r.model and r.train_seed == 0)
    assert out == str(Path("results/paper/ft") / run.rel)
    launched = load_config(args[args.index("--config") + 1], [f"model={model}", *overrides])
    assert launched.ft == run.config.ft and launched.model == run.model
    check = check_accelerate_config(ROOT / config_file, launched.ft, processes, root=ROOT)
    assert check.processes * launched.ft.per_device_batch_size * check.accumulation == 16


def test_check_plan_refuses_what_cannot_run_here(tmp_path):
    config = paper()
    # one 80 GiB GPU and too little host RAM to offload: 7B full FT cannot run at all
    with pytest.raises(ConfigError, match=r"authors \(full\).*needs ~\d+ GiB on one device.*would fit: LoRA here.*"
                                          r"ZeRO-3 with CPU offload.*ZeRO-3 on 2 x 80 GiB GPUs") as error:
        check_plan(config, Machine(1, 80 * GIB, 64 * GIB, ""), tmp_path)
    assert "\n" not in str(error.value)
    # with the host RAM it fits with offload, but reproduce.py's one process cannot run it: the command
    with pytest.raises(ConfigError, match=r"needs ZeRO-3 \+ CPU offload x1 .*accelerate launch --config_file "
                                          r"configs/accelerate/deepspeed_zero3_offload.yaml .* each of its 3 unfinished"):
        check_plan(config, Machine(1, 80 * GIB, 200 * GIB, ""), tmp_path)
    # once those runs are finished (launched by hand into reproduce's folders) the study may start
    for run in plan_ft(config):
        if run.protocol == "authors" and "7B" in run.model:
            (tmp_path / "ft" / run.rel).mkdir(parents=True)
            (tmp_path / "ft" / run.rel / "summary.json").write_text("{}")
    assert check_plan(config, Machine(1, 80 * GIB, 200 * GIB, ""), tmp_path).rows


@pytest.mark.parametrize("preset", ["cpu", "quick", "ladder"])
def test_cpu_presets_fit_this_kind_of_machine(preset, tmp_path):
    config = load_config(str(ROOT / "configs" / f"{preset}.yaml"))
    result = check_plan(config, Machine(0, 0.0, 23 * GIB, "the project's 2-core CPU machine"), tmp_path)
    assert result.rows and all(r.fits for r in result.rows)


def test_tiny_study_fits_and_plans_in_a_moment(tmp_path):
    import time

    config = load_config(None, ["model=tiny-random-qwen2", "reproduce.ft_n_train=[16]"])
    started = time.perf_counter()
    result = check_plan(config, results=tmp_path)
    assert time.perf_counter() - started < 5.0  # it runs before every study: no model is loaded
    assert result.rows and all(r.fits for r in result.rows)


def test_plan_flags_need_plan():
    from iclvsft.commands import reproduce_main

    with pytest.raises(ConfigError, match="only with --plan"):
        reproduce_main(["--config", str(PAPER), "--plan-gpus", "8"])


def test_cpu_time_estimates_match_the_measured_cpu_study(bf16_cpu):
    """configs/cpu.yaml on the project's 2-core CPU (docs/results.md, results/cpu/timings.json):
    ICL sweep 5.8 min, the twelve LoRA runs with their evaluations 19.7 min. Estimates within 50%."""
    config = load_config(str(ROOT / "configs" / "cpu.yaml"))
    rows = plan.plan_study(config, Machine(0, 0.0, 23 * GIB, ""), Path("results/cpu")).rows
    icl = sum(r.seconds for r in rows if r.stage == "ICL") / 60
    ft = sum(r.seconds for r in rows if r.stage == "FT") / 60
    assert icl == pytest.approx(5.8, rel=0.5) and ft == pytest.approx(19.7, rel=0.5)


# ----------------------------------------------------------------------------------------------
# accelerate configs
# ----------------------------------------------------------------------------------------------

# per shipped file: the accumulation for (the paper's LoRA protocol, its authors' protocol), or None
# where processes x per-device batch does not divide the effective batch (and the fix to name)
ACCELERATE_EXPECTED = {
    "single_process.yaml": (1, 4),
    "ddp.yaml": ("ft.per_device_batch_size=8", 2),
    "fsdp.yaml": ("ft.per_device_batch_size=4", 1),
    "deepspeed_zero3.yaml": ("ft.per_device_batch_size=4", 1),
    "deepspeed_zero3_offload.yaml": (1, 4),
}


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_every_accelerate_config_is_checked_against_the_batch(path):
    assert path.name in ACCELERATE_EXPECTED, f"{path.name}: add its expected verdicts here"
    config = paper()
    for protocol, want in zip(["answer_lora", "authors"], ACCELERATE_EXPECTED[path.name], strict=True):
        ft = protocol_ft(config, protocol)
        if isinstance(want, int):
            check = check_accelerate_config(path, ft, root=ROOT)
            assert check.accumulation == want, protocol
            assert check.processes * ft.per_device_batch_size * check.accumulation == ft.batch_size
        else:
            with pytest.raises(ConfigError, match=rf"does not divide ft.batch_size 16; set {want}"):
                check_accelerate_config(path, ft, root=ROOT)


def test_accelerate_check_names_the_fix():
    authors = protocol_ft(paper(), "authors")
    zero3 = ROOT / "configs/accelerate/deepspeed_zero3.yaml"
    with pytest.raises(ConfigError, match=r"8 processes x ft.per_device_batch_size 4 = 32 rows per pass does not "
                                          r"divide ft.batch_size 16; set ft.per_device_batch_size=2 or --num_processes 4"):
        check_accelerate_config(zero3, authors, num_processes=8, root=ROOT)
    assert check_accelerate_config(zero3, dataclasses.replace(authors, per_device_batch_size=2), 8, root=ROOT).accumulation == 1
    with pytest.raises(ConfigError, match="shards nothing"):
        check_accelerate_config(zero3, authors, num_processes=1, root=ROOT)


def test_accelerate_check_refuses_fixed_deepspeed_batches(tmp_path):
    import json

    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": 32}))
    (tmp_path / "ds.yaml").write_text("distributed_type: DEEPSPEED\nnum_processes: 4\n"
                                      f"deepspeed_config:\n  deepspeed_config_file: {tmp_path / 'ds.json'}\n")
    with pytest.raises(ConfigError, match="train_batch_size 32 disagrees with the config"):
        check_accelerate_config(tmp_path / "ds.yaml", protocol_ft(paper(), "authors"))
    (tmp_path / "mp.yaml").write_text("distributed_type: MULTI_GPU\nnum_processes: 2\nmixed_precision: bf16\n")
    with pytest.raises(ConfigError, match="mixed_precision"):
        check_accelerate_config(tmp_path / "mp.yaml", protocol_ft(paper(), "authors"))
    offload = json.loads((ROOT / "configs/accelerate/ds_zero3_offload.json").read_text())
    del offload["optimizer"]
    (tmp_path / "ds.json").write_text(json.dumps(offload))
    with pytest.raises(ConfigError, match="needs an \"optimizer\" section"):
        check_accelerate_config(tmp_path / "ds.yaml", protocol_ft(paper(), "authors"))
