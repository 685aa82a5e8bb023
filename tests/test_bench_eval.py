"""benchmarks/bench_eval.py runs lm-evaluation-harness in the precision test.py runs in."""
import sys

import pytest
from conftest import ROOT

import iclvsft.models.precision as precision
from iclvsft.config.schema import DTYPES

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_eval import resolved_dtype  # noqa: E402


@pytest.mark.parametrize("native_bf16, auto", [(True, "bfloat16"), (False, "float32")])
def test_both_tools_get_the_dtype_auto_resolves_to_on_this_cpu(monkeypatch, native_bf16, auto):
    """lm-eval is told a dtype by name; `auto` must become what test.py resolves it to here. On a CPU
    without native bf16 that is fp32 (it once became bf16 for lm-eval alone: fp32 against emulated bf16)."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native_bf16)
    model = "qwen2.5-coder-0.5b-instruct"
    assert resolved_dtype("auto", model) == ({"bfloat16": "bf16", "float32": "fp32"}[auto], auto)
    assert resolved_dtype("bf16", model) == ("bf16", "bfloat16") and resolved_dtype("fp32", model) == ("fp32", "float32")
    # test.py is handed the first name: its --dtype (the config key) must accept it
    assert all(resolved_dtype(d, model)[0] in DTYPES for d in ("auto", "bf16", "fp16", "fp32"))
