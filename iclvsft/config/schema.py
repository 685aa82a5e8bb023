"""The config schema: typed, frozen sections with a help string per key (shown by ``--help``), their
defaults, the checks each key needs, and the facts derived from several keys (``Config.eval_tasks``).

:mod:`iclvsft.config.load` builds a :class:`Config` from YAML and overrides; everything after reads its
attributes (``cfg.ft.learning_rate``). A config is never edited: a variant is ``derive(cfg, {...})``.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..io import host_ram_bytes
from ..optimizers import OPTIMIZERS, STOCHASTIC_ROUNDING, optimizer_installed, optimizer_package
from ..reporting import REPORTERS, report_to_list, reporter_installed
from ..tasks import FORMAT_FACTORS, FORMATS, POOLS, PROMPT_STYLES, SPLITS, TASKS, corruption_kinds, get_task, parse_task_list
from ..tasks.base import DISTRIBUTIONS, check_distribution
from ..tasks.formats import format_name

ALL_TASKS = list(TASKS)

# Choices named by more than one module (each defined once, here).
DTYPES = ("auto", "bf16", "fp16", "fp32")
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2")
FT_METHODS = ("lora", "full")
LOSS_ON = ("completion", "sequence")
LOSS_AVERAGES = ("tokens", "rows")
BATCHING = ("padding_free", "padded", "max_length")
LOGITS_ON = ("labels", "all")
PARAM_DTYPES = ("fp32", "bf16")
# transformers schedulers that need no extra arguments (tests check they exist in transformers).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
DEMO_MODES = ("shared", "per_item")
CIRCUIT_CONDITIONS = ("base", "icl", "ft")
CIRCUIT_METHODS = ("attribution", "activation", "both")
CORRUPTIONS = ("answer", "control")
FT_ROWS = ("prompt", "authors_train")
LADDER_SELECT = ("fixed", "max")
class Section:
    """What every config section has: its values as a plain dict (for config.json and run identities)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (v.to_dict() if isinstance(v := getattr(self, f.name), Section) else copy.deepcopy(v))
                for f in dataclasses.fields(self)}


def option(default: Any, help: str, *, choices: Iterable[str] | None = None, minimum: float | None = None,
           below: float | None = None) -> Any:
    """A config field: its default, a help string (shown by --help), and the checks that need no context."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "min": minimum, "below": below}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help, "section": cls})


def _set(section: Any, name: str, value: Any) -> None:
    """A check's normalised value (task names parsed) written into its frozen section, once, while it is built."""
    object.__setattr__(section, name, value)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _int_list(name: str, values: list, minimum: int, empty_ok: bool = False) -> None:
    """A list of distinct integers >= ``minimum`` (non-empty unless ``empty_ok``): a repeated value would
    count the same cell twice, an empty list silently drop cells."""
    _need(empty_ok or len(values) > 0, f"{name} must not be empty")
    _need(all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values),
          f"{name} must hold integers >= {minimum}, got {values!r}")
    _need(len(set(values)) == len(values), f"{name} must not repeat a value, got {values!r}")


@dataclass(frozen=True)
class DataConfig(Section):
    seed: int = option(0, "the data seed: every item's RNG derives from it (iclvsft.rng)")
    tasks: list = option(ALL_TASKS, "tasks to generate")
    train_pattern: int = option(4096, "train pool pattern rows per task (FT rows and ICL demonstrations)", minimum=0)
    train_control: int = option(512, "train pool control rows per task", minimum=0)
    test_pattern: int = option(200, "test pattern items per task", minimum=0)
    test_control: int = option(200, "test control items per task (ignored by tasks without a control split)",
                               minimum=0)
    task_params: dict = option({}, "per-task generation parameters, e.g. {expression: {z_terms: [2, 3]}}")
    distribution: str = option("ours", "what the generators draw: ours, or authors (their training file, evaluation-time "
                               "generators and need_false items; docs/authors-data.md)", choices=DISTRIBUTIONS)
    sandbox_degraded_ok: bool = option(False, "run the code task's programs (its answers are confirmed by running "
                                       "them) even where an operating-system layer of the sandbox (namespaces, "
                                       "privilege drop, no_new_privs, Landlock, seccomp) cannot be set up, contained "
                                       "then by the remaining layers and the interpreter guard; false refuses. "
                                       "manifest.json records the layers either way")

    def check(self, config: dict) -> None:
        _set(self, "tasks", parse_task_list(self.tasks))
        for task in self.tasks:
            check_distribution(get_task(task), self.distribution)
        for task, params in self.task_params.items():
            _need(params is None or isinstance(params, dict),
                  f"data.task_params.{task} must be a mapping of that task's parameters, got {params!r}")
            get_task(task, params)  # raises ConfigError for an unknown task, key or bad value
        _check_data_fits(self)


# Generating a data folder holds every item of every task in memory at once, and fine-tuning and
# evaluation load whole pools: measured 700 (boolean) to 1,330 (code) bytes per item held (tracemalloc,
# 3,000 items each). 500 is below every task, so a size refused against it cannot fit.
BYTES_PER_ITEM = 500
GIB = 2**30


def _check_data_fits(data: DataConfig) -> None:
    """Refuse pool sizes whose items cannot fit in this machine's memory (data.train_pattern=1000000000
    would otherwise draw for days and then be killed)."""
    ram = host_ram_bytes()
    items = sum(getattr(data, f"{pool}_{split}") for task in data.tasks
                for split in get_task(task, data.task_params.get(task)).splits for pool in POOLS)
    need = items * BYTES_PER_ITEM
    _need(not ram or need <= ram,
          f"data: {items:,} items over {len(data.tasks)} task(s) need at least {need / GIB:,.0f} GiB of memory to "
          f"generate or load (>= {BYTES_PER_ITEM} bytes each, held at once), more than this machine's "
          f"{ram / GIB:,.0f} GiB; lower data.train_pattern, data.train_control, data.test_pattern or data.test_control")


@dataclass(frozen=True)
class EvalConfig(Section):
    tasks: list = option([], "tasks to evaluate; empty: data.tasks")
    shots: list = option([0, 4, 16], "k demonstrations per prompt (0 = zero-shot)")
    demo_seeds: list = option([0, 1, 2], "one demo set per (k, demo seed); k = 0 runs once")
    demo_mode: str = option("shared", "shared: one demo set per cell, KV-cached | per_item: fresh demos per item "
                            "(the authors')", choices=DEMO_MODES)
    demo_split: str = option("pattern", "which train split demonstrations come from")
    splits: list = option(["pattern", "control"], "test splits to evaluate")
    limit: int = option(0, "items per split (0 = all)", minimum=0)
    batch_size: int = option(16, "items per forward pass", minimum=1)
    max_new_tokens: int = option(0, "greedy tokens per answer; 0: longest train answer + a margin, per task (the "
                                 "authors' format: their fixed budgets)", minimum=0)
    constrained: bool = option(True, "also score binary tasks by the label's log-probability")

    def check(self, config: dict) -> None:
        if self.tasks:
            _set(self, "tasks", parse_task_list(self.tasks))
        _int_list("eval.shots", self.shots, 0)
        _int_list("eval.demo_seeds", self.demo_seeds, 0, empty_ok=not any(self.shots))
        _need(bool(self.splits) and all(s in SPLITS for s in self.splits) and len(set(self.splits)) == len(self.splits),
              f"eval.splits must be distinct names from {', '.join(SPLITS)}, got {self.splits!r}")
        _need(self.demo_split in SPLITS, f"eval.demo_split must be one of {', '.join(SPLITS)}, got {self.demo_split!r}")


@dataclass(frozen=True)
class LoraConfig(Section):
    r: int = option(16, "adapter rank", minimum=1)
    alpha: int = option(32, "scaling numerator: the update is (alpha / r) * B @ A")
    dropout: float = option(0.05, "dropout on the adapter's input", minimum=0, below=1)
    target_modules: str = option("all-linear", "all-linear (every linear layer but the output head) or a list of "
                                 "module names, e.g. [q_proj, v_proj]")

    def check(self, config: dict) -> None:
        _need(self.alpha > 0, f"ft.lora.alpha must be > 0, got {self.alpha}")
        targets = self.target_modules
        _need(bool(targets) and (isinstance(targets, str) or all(isinstance(t, str) and t for t in targets)),
              f"ft.lora.target_modules must be 'all-linear' or a non-empty list of module names, got {targets!r}")


@dataclass(frozen=True)
class FtConfig(Section):
    method: str = option("lora", "lora (peft adapter, base frozen) | full (every parameter, fp32 master weights)",
                         choices=FT_METHODS)
    tasks: list = option([], "tasks trained together, n_train rows each (several = the paper's mixed file); empty: --task")
    n_train: int = option(256, "rows per task: the first N pattern rows of <data>/<task>/train.jsonl", minimum=1)
    train_seed: int = option(0, "seeds the mixed-task shuffle, LoRA init, dropout and the epoch order")
    loss_on: str = option("completion", "completion (answer tokens only) | sequence (prompt + answer: the authors')",
                          choices=LOSS_ON)
    append_eos: bool = option(True, "end each completion with the eos token (teaches stopping); the authors did not")
    loss_average: str = option("tokens", "tokens: the step's loss is the mean over all its labelled tokens "
                               "(transformers') | rows: each row's token mean, averaged over the step's rows (the "
                               "authors': one row per pass with gradient accumulation)", choices=LOSS_AVERAGES)
    epochs: float = option(2.0, "passes over the rows; ignored when max_steps > 0")
    max_steps: int = option(0, "> 0: exactly this many optimizer steps (the authors: 100), overrides epochs",
                            minimum=0)
    learning_rate: float = option(2.0e-4, "peak learning rate (the authors' full FT: 1e-5)")
    lr_scheduler: str = option("linear", "a transformers scheduler that needs no extra arguments",
                               choices=LR_SCHEDULERS)
    warmup_steps: int = option(0, "optimizer steps of linear warm-up (the authors: 20)", minimum=0)
    weight_decay: float = option(0.0, "AdamW weight decay", minimum=0)
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: no clipping)", minimum=0)
    optimizer: str = option("adamw_torch_fused", "a transformers optimizer name (TrainingArguments.optim); "
                            "adamw_torch_fused: torch's fused AdamW kernel (CPU and CUDA), ~8x faster than the "
                            "per-tensor loop of adamw_torch on the 0.5B model's full FT here | adamw_torch_8bit, "
                            "adamw_torch_4bit: torchao's AdamW with 8-/4-bit moments (2 / 1 bytes per parameter "
                            "instead of 8; the torchao package), for full FT of models too large otherwise")
    param_dtype: str = option("fp32", "full FT: the dtype the trained weights and their gradients are held in: fp32 "
                              "(master weights under bf16 autocast) | bf16 (half the bytes; each update rounded to "
                              "bf16 stochastically, so it needs ft.optimizer adamw_torch_8bit or adamw_torch_4bit)",
                              choices=PARAM_DTYPES)
    batch_size: int = option(16, "effective rows per optimizer step = per_device_batch_size x devices x "
                             "accumulation")
    per_device_batch_size: int = option(4, "rows per forward pass on one device; accumulation makes up batch_size",
                                        minimum=1)
    max_length: int = option(512, "max tokens per row; longer rows are cut at the end (a row left with no answer "
                             "token: error)", minimum=2)
    batching: str = option("padding_free", "padding_free (rows concatenated, positions restart per row, no padding) "
                           "| padded (right-pad to the longest row) | max_length (pad every row to max_length: the "
                           "authors')", choices=BATCHING)
    logits_on: str = option("labels", "labels: the output layer runs only at positions whose next token has a "
                            "label (same loss and gradients; with the answer-only loss most of the output layer's "
                            "work is skipped) | all: at every position (transformers' default)", choices=LOGITS_ON)
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass: less memory, slower")
    save_steps: int = option(50, "a resumable checkpoint every N optimizer steps (0: none)", minimum=0)
    keep_checkpoints: bool = option(False, "keep <out>/checkpoints after the run finishes (they hold the optimizer "
                                    "state)")
    logging_steps: int = option(1, "a train_log.jsonl line every N optimizer steps", minimum=1)
    report_to: str = option("none", "also log training to (besides train_log.jsonl): none | "
                            + " | ".join(REPORTERS) + " or a list of them (the Trainer's report_to; the package "
                            "must be installed); tensorboard writes under <out>/runs/")
    rows: str = option("prompt", "prompt: a row is the zero-shot evaluation prompt plus its completion | "
                       "authors_train: the authors' training text (format authors only: no header, expression's "
                       "older '+=')", choices=FT_ROWS)
    lora: LoraConfig = section(LoraConfig, "the LoRA adapter (ft.method lora)")

    def check(self, config: dict) -> None:
        if self.tasks:
            _set(self, "tasks", parse_task_list(self.tasks))
        _need(self.max_steps > 0 or self.epochs > 0, f"ft.epochs must be > 0 when ft.max_steps is 0, got {self.epochs}")
        _need(self.learning_rate > 0, f"ft.learning_rate must be > 0, got {self.learning_rate}")
        _need(self.batch_size >= 1 and self.batch_size % self.per_device_batch_size == 0,
              f"ft.batch_size ({self.batch_size}, rows per optimizer step) must be a positive multiple of "
              f"ft.per_device_batch_size ({self.per_device_batch_size})")
        _need(self.optimizer in OPTIMIZERS, f"ft.optimizer: unknown optimizer {self.optimizer!r}; use a transformers "
              "TrainingArguments.optim name, e.g. adamw_torch_fused (the default) or adamw_torch_8bit")
        package = optimizer_package(self.optimizer)
        _need(optimizer_installed(self.optimizer), f"ft.optimizer={self.optimizer} needs the {package} package: "
              f"pip install {package} (or ft.optimizer=adamw_torch_fused)")
        if self.param_dtype == "bf16":
            _need(self.method == "full", f"ft.param_dtype=bf16 applies to ft.method=full (LoRA trains an fp32 "
                  f"adapter), got ft.method={self.method}")
            _need(self.optimizer in STOCHASTIC_ROUNDING, f"ft.param_dtype=bf16 needs an optimizer that rounds its "
                  f"updates to bf16 stochastically: ft.optimizer={' or '.join(STOCHASTIC_ROUNDING)}, got "
                  f"{self.optimizer}")
            _need(config.get("dtype", "auto") in ("auto", "bf16"), f"ft.param_dtype=bf16 trains in bf16: it needs "
                  f"dtype bf16 or auto, got dtype {config.get('dtype')}")
        _need(self.rows == "prompt" or config.get("format") == "authors",
              "ft.rows authors_train needs format: authors (our FT rows are the evaluation prompt)")
        for name in report_to_list(self.report_to):
            _need(name in REPORTERS, f"ft.report_to: unknown logger {name!r}; use none or one of "
                  f"{', '.join(REPORTERS)}")
            _need(reporter_installed(name), f"ft.report_to={name} needs the {REPORTERS[name][0]} package: "
                  f"pip install {REPORTERS[name][0]} (or ft.report_to=none)")


@dataclass(frozen=True)
class ReproduceConfig(Section):
    models: list = option([], "models to study, each gets the full sweep; empty: [model]")
    icl: bool = option(True, "the ICL sweep of the eval section (shots x demo seeds) on the base model")
    ft_tasks: list = option([], "tasks fine-tuned one at a time; empty: data.tasks")
    ft_n_train: list = option([16, 64, 256], "FT rows per task (the first N pattern rows)")
    ft_train_seeds: list = option([0], "one fine-tuned model per (protocol, tasks, N, seed)")
    ft_protocols: dict = option({"answer_lora": {}}, "FT protocols: name -> overrides of the ft section. A protocol "
                                "that sets `tasks` trains one model on those tasks mixed (the paper's setting) and "
                                "evaluates it on each of them")
    ft_protocol_tasks: dict = option({}, "protocol name -> tasks it runs on (default: ft_tasks)")
    ft_protocol_n_train: dict = option({}, "protocol name -> its N values (default: ft_n_train)")
    ft_eval_shots: list = option([0], "shots when evaluating fine-tuned models (0: zero-shot, the protocol)")
    # The verdict compares one ICL cell with one FT cell on the same pattern items, chosen here, before
    # any test item is scored (a maximum over cells would be optimistic).
    compare_shots: int = option(-1, "the ICL cell of the verdict: k demonstrations (-1: the largest k in "
                                "eval.shots)", minimum=-1)
    compare_n_train: int = option(0, "the FT cell of the verdict: N rows (0: the largest N of compare_protocol)",
                                  minimum=0)
    compare_protocol: str = option("", "the FT protocol of the verdict (empty: the first of ft_protocols)")
    compare_train_seeds: list = option([], "train seeds of the verdict's FT cell (empty: ft_train_seeds)")
    max_invalid: float = option(0.5, "a compared cell whose share of invalid (unparseable) answers on pattern items "
                                "exceeds this gives no verdict (the report says why); 1: never", minimum=0)
    smoke: bool = option(False, "the preset is a smoke test: report.md says at the top that its numbers are no findings")

    def check(self, config: dict) -> None:
        _need(self.max_invalid <= 1, f"reproduce.max_invalid is a share in [0, 1], got {self.max_invalid}")
        _need(len(set(map(str, self.models))) == len(self.models), f"reproduce.models repeats a model: {self.models}")
        _int_list("reproduce.ft_n_train", self.ft_n_train, 1)
        _int_list("reproduce.ft_train_seeds", self.ft_train_seeds, 0)
        _need(len(set(seeds := self.compare_train_seeds)) == len(seeds) and all(isinstance(x, int) and x >= 0 for x in seeds),
              f"reproduce.compare_train_seeds must be distinct integers >= 0, got {seeds}")
        _int_list("reproduce.ft_eval_shots", self.ft_eval_shots, 0)
        for name, values in self.ft_protocol_n_train.items():
            _int_list(f"reproduce.ft_protocol_n_train.{name}", values, 1)
        _need(not self.compare_protocol or self.compare_protocol in self.ft_protocols,
              f"reproduce.compare_protocol {self.compare_protocol!r} is not one of reproduce.ft_protocols "
              f"({', '.join(self.ft_protocols)})")


@dataclass(frozen=True)
class CircuitsConfig(Section):
    enabled: bool = option(False, "reproduce.py runs the analysis (and adds its report section) only when true")
    tasks: list = option(["expression"], "tasks to analyse; each needs a corruption (its task file's `corrupt`)")
    split: str = option("pattern", "test split the clean items come from", choices=("pattern", "control"))
    n_items: int = option(32, "clean/corrupted pairs per task: the first test items that have a usable twin",
                          minimum=1)
    shots: int = option(4, "k demonstrations in the ICL condition (the first k of evaluate.demo_order)", minimum=1)
    demo_seed: int = option(0, "the ICL condition's demo set (one set, the same for every item)")
    corruption: str = option("answer", "answer: minimal edit of what the answer is read from (expression: S) | "
                             "control: expression's Z edited (the control twin)", choices=CORRUPTIONS)
    method: str = option("attribution", "attribution (gradient x activation difference, fast) | activation (exact "
                         "patching, one pass per component) | both", choices=CIRCUIT_METHODS)
    activation_items: int = option(0, "with method attribution: also exact-patch the first N pairs, to check the "
                                   "approximation", minimum=0)
    batch_size: int = option(32, "patched copies per forward pass in activation patching", minimum=1)
    dtype: str = option("fp32", "the analysis' precision; fp32 because bf16 logits near 20 are 0.125 apart, "
                        "coarser than many effects; \"\" = the top-level dtype")
    adapter: str = option("", "the FT condition's fine-tuned folder (a LoRA adapter or a fully fine-tuned model), "
                          "\"{task}\" replaced by the task (e.g. "
                          "runs/ft-{task}-256); empty: no FT condition")
    bootstrap: int = option(1000, "bootstrap resamples of the items for the 95% intervals (0: none)", minimum=0)
    top_k: int = option(20, "components compared by the top-k overlap", minimum=1)
    seed: int = option(0, "seeds the choice of corruption edits and the bootstrap")

    def check(self, config: dict) -> None:
        _set(self, "tasks", parse_task_list(self.tasks))
        kinds = corruption_kinds()
        for name in self.tasks:
            _need(name in kinds, f"circuits.tasks: no corruption is defined for {name!r}; supported: "
                  f"{', '.join(kinds)}")
            _need(self.corruption in kinds[name], f"circuits.corruption {self.corruption!r} is not defined for "
                  f"{name!r} (it has {', '.join(kinds[name])})")


@dataclass(frozen=True)
class LadderConfig(Section):
    tasks: list = option([], "the ladder's tasks (each rung's ICL and FT are evaluated on each); empty: no ladder")
    rungs: list = option([], "cumulative rungs from the authors' setup to ours, each {name, why, set: {dotted.key: "
                         "value}}: the first sets the authors' setup over this config, each next one changes one "
                         "factor (docs/ladder.md)")
    train_seeds: list = option([0], "train seeds of each rung's fine-tuned model(s) (a rung's `set` may change "
                               "them, e.g. three seeds at the first and the last rung)")
    first_rung_models: list = option([], "other models that also run the first rung (the authors' setup), e.g. "
                                     "a base model: does it behave differently under their protocol?")
    first_rung_seeds: list = option([], "train seeds of the first rung on ladder.first_rung_models (empty: the "
                                    "first rung's own), e.g. [0] where three seeds of each would not fit the budget")
    icl_select: str = option("fixed", "the ICL cell a rung reports: fixed (k = fixed_k) | max (the k of eval.shots "
                             "with the best pattern accuracy by the authors' substring score: their reading)",
                             choices=LADDER_SELECT)
    fixed_k: int = option(16, "k of the ICL cell when icl_select is fixed", minimum=1)
    shortened: str = option("", "what the preset shortens relative to the authors' setup (stated in the report)")

    def check(self, config: dict) -> None:
        if self.tasks:
            _set(self, "tasks", parse_task_list(self.tasks))
        _int_list("ladder.train_seeds", self.train_seeds, 0)
        _int_list("ladder.first_rung_seeds", self.first_rung_seeds, 0, empty_ok=True)
        for n, rung in enumerate(self.rungs):
            _need(isinstance(rung, dict) and isinstance(rung.get("name"), str) and isinstance(rung.get("set", {}), dict)
                  and set(rung) <= {"name", "why", "set"},
                  f"ladder.rungs[{n}] must be a mapping with name, why and set (a mapping of dotted config keys), "
                  f"got {rung!r}")


@dataclass(frozen=True)
class Config(Section):
    name: str = option("", "the config's name (results/<name>/); defaults to the YAML file's stem")
    data: DataConfig = section(DataConfig, "data generation (generate_data.py)")
    model: str = option("qwen2.5-coder-0.5b-instruct", "the model under study: an offline name "
                        "(qwen2.5-coder-0.5b-instruct, ...), a hub id or a folder")
    dtype: str = option("auto", "auto (bf16 where the hardware runs it natively, else fp32) | bf16 | fp16 | fp32",
                        choices=DTYPES)
    format: str = option("ours", "prompt format of ICL prompts, FT rows and scoring: ours (each task file's header "
                         "and question) | authors (their release's headers, question and label formats and fixed "
                         "token budgets; expression, relation, boolean, algebra)", choices=FORMATS)
    format_ours: list = option([], "with format authors: the factors of their format shown our way, the rest "
                               f"theirs (the ladder's one factor per rung): any of {', '.join(FORMAT_FACTORS)} "
                               "(docs/ladder.md)")
    prompt_style: str = option("raw", "raw: the prompt template's text as is | chat: the same text as the user's "
                               "message of the tokenizer's chat template, the answer as the assistant's reply (ICL, FT "
                               "and scoring alike; instruct models)", choices=PROMPT_STYLES)
    attn_implementation: str = option("auto", "auto (flash_attention_2 on CUDA when installed, else sdpa) | sdpa | "
                                      "eager", choices=ATTN_IMPLEMENTATIONS)
    eval: EvalConfig = section(EvalConfig, "evaluation (test.py)")
    ft: FtConfig = section(FtConfig, "fine-tuning (finetune.py)")
    reproduce: ReproduceConfig = section(ReproduceConfig, "reproduce.py: the whole study for this config")
    circuits: CircuitsConfig = section(CircuitsConfig, "circuit shift (analyze_circuits.py): which heads and MLPs "
                                       "carry the answer under base zero-shot, base + k demonstrations and base + "
                                       "fine-tuned adapter")
    ladder: LadderConfig = section(LadderConfig, "reproduce.py: the ladder from the authors' setup to ours, one "
                                   "factor per rung (docs/ladder.md)")

    def check(self, config: dict) -> None:
        _need(not self.format_ours or self.format == "authors",
              f"format_ours {self.format_ours!r} names factors of the authors' format: it needs format: authors")
        _need(len(set(self.format_ours)) == len(self.format_ours), f"format_ours repeats a factor: {self.format_ours!r}")
        format_name(self.format, self.format_ours)  # one line for an unknown factor

    # Defaults that depend on other keys, each worked out here and only here.
    @property
    def prompt_format(self) -> str:
        """The prompt format's one name (``format`` with ``format_ours``): ``ours``, ``authors`` or e.g.
        ``authors+ours:budget,labels`` (``iclvsft.tasks.formats.format_name``)."""
        return format_name(self.format, self.format_ours)

    @property
    def eval_tasks(self) -> list[str]:
        """The tasks evaluated: ``eval.tasks``, else ``data.tasks``."""
        return list(self.eval.tasks or self.data.tasks)

    @property
    def models(self) -> list[str]:
        """The models studied: ``reproduce.models``, else ``[model]``."""
        return list(self.reproduce.models) or [self.model]

    @property
    def ft_tasks(self) -> list[str]:
        """The tasks fine-tuned one at a time: ``reproduce.ft_tasks``, else ``data.tasks``."""
        return list(self.reproduce.ft_tasks or self.data.tasks)


DEFAULTS: dict[str, Any] = Config().to_dict()
