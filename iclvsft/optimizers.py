"""``ft.optimizer``: the Trainer's optimizer names (transformers' ``TrainingArguments.optim``), the
package each one needs, and the low-precision ones that make full fine-tuning of a 1.5B model fit a
24 GB machine (checked when the config loads, like ``ft.report_to``: found, not imported).

Full FT with the default ``adamw_torch_fused`` holds, per parameter, fp32 weights 4 + fp32 gradients 4
+ fp32 AdamW moments 8 bytes (+ the bf16 autocast copies of the weights in the forward pass):
~26 GiB for Qwen2.5-1.5B, refused on a 24 GB machine. torchao's AdamW keeps both moments in 8 bits
(``adamw_torch_8bit``: 1 byte + one fp32 scale per 256 values, each) or 4 bits (``adamw_torch_4bit``),
and with ``ft.param_dtype=bf16`` the weights and gradients are bf16 and each update is rounded to
bf16 stochastically (torchao's ``bf16_stochastic_round``): 2 + 2 + 2.03 bytes per parameter.
benchmarks/README.md ("Full fine-tuning in low precision") has the measurements behind the choice.
"""
from __future__ import annotations

import importlib.util

# transformers 5.24's OptimizerNames, each with (module it imports, pip package); None: torch alone.
# tests/test_train.py checks the names are transformers' own and the presence checks agree with its.
_BNB = ("bitsandbytes", "bitsandbytes")
OPTIMIZERS: dict[str, tuple[str, str] | None] = {
    "adamw_torch": None, "adamw_torch_fused": None, "adafactor": None, "sgd": None, "adagrad": None,
    "rmsprop": None,
    "adamw_torch_xla": ("torch_xla", "torch_xla"), "adamw_torch_npu_fused": ("torch_npu", "torch_npu"),
    "adamw_anyprecision": ("torchdistx", "torchdistx"),
    "adamw_torch_4bit": ("torchao", "torchao"), "adamw_torch_8bit": ("torchao", "torchao"),
    **dict.fromkeys(("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "ademamix",
                     "ademamix_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "lion_8bit", "lion_32bit",
                     "paged_lion_32bit", "paged_lion_8bit", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit"),
                    _BNB),
    **dict.fromkeys(("galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
                     "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise"), ("galore_torch", "galore-torch")),
    **dict.fromkeys(("apollo_adamw", "apollo_adamw_layerwise"), ("apollo_torch", "apollo-torch")),
    **dict.fromkeys(("lomo", "adalomo"), ("lomo_optim", "lomo-optim")),
    "grokadamw": ("grokadamw", "grokadamw"),
    **dict.fromkeys(("schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd"),
                    ("schedulefree", "schedulefree")),
    "stable_adamw": ("optimi", "torch-optimi"),
}

#: torchao's low-bit AdamW: moments quantized blockwise, the update computed in fp32 and, for bf16
#: weights, rounded to bf16 stochastically (the Trainer's optim_args ``bf16_stochastic_round=True``).
#: The only names ``ft.param_dtype=bf16`` trains with: a round-to-nearest bf16 update loses every step
#: smaller than half a bf16 ulp of its weight (an Adam step moves a weight by about the learning rate,
#: 1e-5 in the authors' full FT; half an ulp of a weight of 0.02 is 6e-5), stochastic rounding keeps
#: such steps on average.
STOCHASTIC_ROUNDING = ("adamw_torch_8bit", "adamw_torch_4bit")


def optimizer_package(name: str) -> str | None:
    """The pip package ``ft.optimizer=<name>`` needs besides torch and transformers (None: none)."""
    need = OPTIMIZERS.get(name)
    return need[1] if need else None


def optimizer_installed(name: str) -> bool:
    """Whether the package ``ft.optimizer=<name>`` needs is importable (found, not imported)."""
    need = OPTIMIZERS.get(name)
    return need is None or importlib.util.find_spec(need[0]) is not None
